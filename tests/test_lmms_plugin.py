"""lmms_plugin.py under lmms-eval's own evaluator (simple_evaluate) on two local tasks (a task YAML over a local
JSON-lines file, no download): generation (generate_until, exact match) and a 2-way choice (loglikelihood)."""
import json
import os

import pytest
import torch

import data
import model as M

pytestmark = pytest.mark.slow

UTILS = '''
from PIL import Image

def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]

def doc_to_text(doc):
    return doc["question"]
'''

GEN_TASK = """task: cd_local_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  until: ["."]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHOICE_TASK = """task: cd_local_choice
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: 0
doc_to_choice: ["red", "blue"]
metric_list:
  - metric: acc
"""


def test_lmms_eval_runs_a_local_task_end_to_end(tokenizer, tmp_path):
    lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install lmms-eval==0.7.3; "
                                    ".ci/run installs it)")
    import lmms_plugin
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from PIL import Image
    src = str(tmp_path / "model")
    mllm = M.from_preset("student", tokenizer, seed=4)
    M.save_pretrained(mllm, src, tokenizer, M.make_image_processor(mllm.vision_tower.config))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = []
    for i, colour in enumerate([(220, 30, 30), (30, 70, 230), (30, 160, 40)]):
        path = str(tmp_path / f"im{i}.png")
        Image.new("RGB", (64, 64), colour).save(path)
        rows.append({"question": "What color is the circle?", "answer": "red", "image": path})
    with open(tasks / "docs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=tasks / "docs.jsonl"))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=tasks / "docs.jsonl"))
    lmms_plugin.register()
    out = simple_evaluate(model="compodistill", model_args=f"pretrained={src},device=cpu",
                          tasks=["cd_local_gen", "cd_local_choice"], task_manager=TaskManager(include_path=str(tasks)),
                          log_samples=True, batch_size=1)
    assert "exact_match,none" in out["results"]["cd_local_gen"] and "acc,none" in out["results"]["cd_local_choice"]
    ours, tok, proc = M.load_any(src)
    generate, _ = __import__("evaluate").model_fns(ours, tok, proc, max_new_tokens=3, progress=False)
    expected = [a.split(".")[0].strip() for a in generate([{"prompt": "<image>\n" + r["question"], "image": r["image"]}
                                                            for r in rows])]
    got = [s["filtered_resps"][0] for s in sorted(out["samples"]["cd_local_gen"], key=lambda s: s["doc_id"])]
    assert got == expected
    # log-likelihoods: the prompt's ids, then the continuation tokenized on its own (ChatML's assistant header
    # ends the prompt), scored by a float64 log-softmax of the model's logits
    for s in out["samples"]["cd_local_choice"]:
        r = rows[s["doc_id"]]
        for (score, greedy), choice in zip([x[0] if isinstance(x[0], (list, tuple)) else x for x in s["resps"]],
                                           ["red", "blue"]):
            prompt = data.render_prompt(tok, [{"role": "user", "content": "<image>\n" + r["question"]}],
                                        ours.num_visual_tokens, ours.image_token_id)
            cont = tok(" " + choice, add_special_tokens=False).input_ids  # lmms-eval's continuation: " " + choice
            x = torch.tensor([prompt + cont])
            pixels = proc(images=[Image.open(r["image"]).convert("RGB")], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                logits = ours(x, torch.ones_like(x), pixels)["logits"][0].double()
            logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            ref = float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())
            assert abs(score - ref) < 1e-4, (score, ref)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


def test_the_plugin_says_how_to_install_lmms_eval_when_absent(monkeypatch):
    import lmms_plugin
    monkeypatch.setattr(lmms_plugin, "_LMMS", object)
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        lmms_plugin.CompoDistill("anything")
