"""Fixtures shared by the analysis tests (the tiny model itself comes from tests/conftest.py)."""

import pytest

import prunerep_jax as pj


@pytest.fixture(scope="session")
def eos(params, cfg, tokens):
  """An EOS id that ends dense row 0 within 3 greedy steps: its third greedy token (from the
  same 3-step generation that layerwise(decode_steps=3) runs, so it compiles once)."""
  eos = int(pj.generate(params, cfg, tokens, 3).tokens[0, 2])
  assert eos != cfg.pad_token_id
  return eos
