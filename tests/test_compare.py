"""`cidistill compare` measures the config it is given: its cached evaluations are keyed by the eval stage's
fingerprint with the recipe's trained student as input. It used to return any earlier run's numbers (a
variant's `eval.json` whenever it existed, the eval stage's results whenever that stage had ever finished),
and ignored `--force`."""
import dataclasses

from cidistill.app.compare import compare
from cidistill.core.store import Store


def test_compare_measures_the_config_it_is_given_and_force_measures_again(small_run, tmp_path):
    out = str(tmp_path / "compare")
    stage = Store(small_run.stage_dir("eval")).read_json("results.json")["student"]
    first = compare(small_run, ["config"], use_ray=False, out_dir=out)["results"]["config"]
    assert first["zeroshot_en_top1"] == stage["zeroshot_en_top1"] and "probe_top1" in first  # the eval stage's

    only_zeroshot = dataclasses.replace(small_run, eval=dataclasses.replace(small_run.eval, tasks=["zeroshot"]))
    second = compare(only_zeroshot, ["config"], use_ray=False, out_dir=out)["results"]["config"]
    assert "probe_top1" not in second and second["key"]  # measured for this config, not the stage's results
    assert second["zeroshot_en_top1"] == stage["zeroshot_en_top1"]  # the same student on the same pairs

    cached = Store(out).path("config/eval.json")
    written = Store(out).fs.modified(cached)
    assert compare(only_zeroshot, ["config"], use_ray=False, out_dir=out)["results"]["config"] == second
    assert Store(out).fs.modified(cached) == written  # the same config again: read from its cache
    compare(only_zeroshot, ["config"], use_ray=False, out_dir=out, force=True)
    assert Store(out).fs.modified(cached) > written  # --force: evaluated again

    back = compare(small_run, ["config"], use_ray=False, out_dir=out)["results"]["config"]
    assert "probe_top1" in back  # the first config again: the eval stage's results, not the cached other one
