"""Two local processes of 2 CPU devices each, joined by `parallel.initialize_distributed`
(jax.distributed with gloo collectives), run one 4-device mesh and get one-device results."""

import pytest

from _subprocess import finish, read_json


@pytest.fixture(scope="module")
def results(children):
  for proc, _ in children["multi_host"]:
    finish(proc, timeout=600)
  return [read_json(out) for _, out in children["multi_host"]]


def test_both_processes_see_four_devices_two_of_them_local(results):
  for r in results:
    assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 4, 2)


def test_forward_across_processes_matches_one_device(results):
  for r in results:
    assert not r["logits_fully_addressable"]  # the result really spans both processes
    assert r["logits_diff"] <= 1e-5


def test_generation_perplexity_and_wanda_across_processes_match_one_device(results):
  for r in results:
    assert r["greedy_equal"]
    assert r["nll_rel"] <= 1e-6
    assert r["wanda_masks_equal"]
