"""The main job end to end (shortened): data, teacher, student LM, three students, evaluation, table."""
import json
import os
import re

import pytest
from PIL import Image

import train


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    train.main(["--demo", "--demo-quick", "--demo-train-teacher", "--out", out])
    printed = capsys.readouterr().out.strip().splitlines()
    last = printed[-1]
    assert re.fullmatch(r"RESULT sft_cr=[\d.]+ kd_cr=[\d.]+ compodistill_cr=[\d.]+ teacher_cr=[\d.]+ "
                        r"sft_vqa=[\d.]+ kd_vqa=[\d.]+ compodistill_vqa=[\d.]+ kd_attn_dist=[\d.]+ "
                        r"compodistill_attn_dist=[\d.]+", last), last
    assert any(line.startswith("| model | ") for line in printed)
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res["summary"]) == {"sft", "kd", "compodistill", "teacher"}
    for name in ("sft", "kd", "compodistill"):
        r = res["results"][name][0]
        assert 0 <= r["cr"] <= 100 and 0 <= r["vqa"] <= 100 and 0 <= r["attn_dist"] <= 2
        assert len(r["cr_subsets"]) == 7
    # the RESULT line reports the same numbers as results.json
    vals = dict(kv.split("=") for kv in last.split()[1:])
    assert abs(float(vals["kd_cr"]) - res["summary"]["kd"]["cr"][0]) < 0.06
    assert Image.open(os.path.join(out, "results.png")).size[0] > 100
    maps = os.listdir(os.path.join(out, "heatmaps"))
    assert maps and all(Image.open(os.path.join(out, "heatmaps", m)).size[0] > 100 for m in maps)
    # the three students saw the same data and steps
    for stage in ("stage1", "stage2", "stage3"):
        assert os.path.exists(os.path.join(out, "compodistill_seed0", stage, "model.safetensors"))
    # the learning curve: validation CR logged during stages 2 and 3 (2 + 2 steps, eval every step)
    curves = json.load(open(os.path.join(out, "learning_curves.json")))
    assert [x for x, _ in curves["compodistill"]] == [1, 2, 3, 4]
    assert [x for x, _ in curves["sft"]] == [1, 2, 3, 4]
    assert all(0 <= y <= 100 for c in curves.values() for _, y in c)
    assert Image.open(os.path.join(out, "learning_curve.png")).size[0] > 100


def test_shipped_teacher_matches_a_freshly_synthesised_world(tmp_path):
    """`python train.py --demo` synthesises the default world and then loads assets/demo_teacher: a change
    to the generator that changes the tokenizer (BPE merges follow the samples) must retrain the teacher."""
    import data
    paths = train.demo_data(str(tmp_path))
    train.check_tokenizers_agree(data.load_tokenizer(paths["tokenizer"]), data.load_tokenizer(train.DEMO_TEACHER))
