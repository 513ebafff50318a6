"""Distillation across vocabularies (train.py --cross-vocab): ULD against a float64 re-computation, the
text-aligned positions on hand-made conversations, and a teacher with its own tokenizer distilling a
student end to end."""
import pytest
import torch

import data
import losses
import shapes
import runs
import train


def test_uld_equals_a_float64_recomputation_values_and_gradients():
    torch.manual_seed(0)
    for V_s, V_t in ((53, 71), (80, 40)):  # the teacher's vocabulary larger, then smaller
        P, D_s, D_t, T = 11, 8, 12, 1.7
        hs = torch.randn(P, D_s, requires_grad=True)
        ht = torch.randn(P, D_t)
        ws, wt = torch.randn(V_s, D_s, requires_grad=True), torch.randn(V_t, D_t)
        got = losses.uld_loss(hs, ht, ws, wt, num_pairs=7, temperature=T, chunk_size=4)  # 3 chunks
        g = torch.autograd.grad(got, (hs, ws))
        hs64, ws64 = hs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
        total = 0.0
        for r in range(P):  # one row at a time, by the definition: sorted, padded, L1
            p = torch.softmax(hs64[r] @ ws64.t() / T, 0).sort(descending=True).values
            q = torch.softmax(ht[r].double() @ wt.double().t() / T, 0).sort(descending=True).values
            n = max(len(p), len(q))
            p = torch.cat([p, p.new_zeros(n - len(p))])
            q = torch.cat([q, q.new_zeros(n - len(q))])
            total = total + (p - q).abs().sum()
        ref = total / 7
        g_ref = torch.autograd.grad(ref, (hs64, ws64))
        assert abs(got.item() - ref.item()) < 1e-6
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-5)


def test_uld_is_zero_for_a_relabelled_vocabulary():
    """ULD ignores token identity: a teacher whose vocabulary is the student's permuted gives 0."""
    torch.manual_seed(1)
    h, w = torch.randn(5, 6), torch.randn(30, 6)
    perm = torch.randperm(30)
    assert losses.uld_loss(h, h, w, w[perm], num_pairs=5).item() < 1e-6


def _messages(answer="a red circle"):
    return [{"role": "user", "content": "<image>\nWhat is on the left?"}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "And the size?"}, {"role": "assistant", "content": "large"}]


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A: BPE on the world's words (whole words are tokens); B: almost character-level (few merges)."""
    root = tmp_path_factory.mktemp("toks")
    a = shapes.train_tokenizer(shapes.world_vocabulary_corpus(), str(root / "a"), vocab_size=1024)
    b = shapes.train_tokenizer(shapes.world_vocabulary_corpus(), str(root / "b"), vocab_size=262)
    return a, b


def test_aligned_pairs_end_at_the_same_character(two_tokenizers):
    a, b = two_tokenizers
    msgs = _messages()
    nv = 4
    ids_a, lab_a, keys_a = data.answer_char_keys(a, msgs, nv, data.image_token_id(a))
    ids_b, lab_b, keys_b = data.answer_char_keys(b, msgs, nv, data.image_token_id(b))
    assert (ids_a, lab_a) == tuple(data.render_conversation(a, msgs, nv, data.image_token_id(a)))
    pairs = data.aligned_pairs(keys_a, keys_b)
    sup_a = [i for i, x in enumerate(lab_a) if x != -100]
    sup_b = [i for i, x in enumerate(lab_b) if x != -100]
    assert len(sup_b) > len(sup_a)  # B splits the answers into more tokens
    # by hand: A's supervised tokens are "a", " red", " circle", <|im_end|> and "large", <|im_end|>; B has a
    # boundary at every character, so every one of A's six pairs, each with the B token ending there
    assert [a.decode([ids_a[i]]) for i in sup_a] == ["a", " red", " circle", "<|im_end|>", "large", "<|im_end|>"]
    assert [i for i, _ in pairs] == sup_a
    for i, j in pairs:
        assert j in sup_b
        if a.decode([ids_a[i]]) == "<|im_end|>":
            assert b.decode([ids_b[j]]) == "<|im_end|>"
            continue
        # the answer text up to token i (A) equals the answer text up to token j (B), within the same turn
        turn_a = [k for k in sup_a if k <= i and (k == i or a.decode([ids_a[k]]) != "<|im_end|>")]
        start_a = max([k for k in sup_a if k < i and a.decode([ids_a[k]]) == "<|im_end|>"] + [-1])
        start_b = max([k for k in sup_b if k < j and b.decode([ids_b[k]]) == "<|im_end|>"] + [-1])
        text_a = a.decode([ids_a[k] for k in sup_a if start_a < k <= i])
        text_b = b.decode([ids_b[k] for k in sup_b if start_b < k <= j])
        assert text_a == text_b and turn_a
    # the other direction pairs the same boundaries
    assert sorted((i, j) for j, i in data.aligned_pairs(keys_b, keys_a)) == sorted(pairs)


def test_aligned_pairs_skip_boundaries_only_one_side_has(two_tokenizers):
    """A word split differently: 'circle' as one token (A) vs 'c','i','r',... (B): only the end of 'circle'
    pairs; B's inner boundaries have no partner, and a position is never paired twice."""
    a, b = two_tokenizers
    msgs = _messages("circle")[:2]
    _, lab_b, keys_b = data.answer_char_keys(b, msgs, 4, data.image_token_id(b))
    _, _, keys_a = data.answer_char_keys(a, msgs, 4, data.image_token_id(a))
    pairs = data.aligned_pairs(keys_b, keys_a)
    n_sup_b = sum(x != -100 for x in lab_b)
    assert n_sup_b >= 4 and len(pairs) == 2  # "circle" ends at character 6, and the end-of-turn marker
    assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == 2


@pytest.fixture(scope="module")
def cross_setup(tmp_path_factory):
    """A world (its tokenizer: the student's) and a teacher with its OWN tokenizer: another BPE vocabulary
    trained on the same corpus (600 tokens instead of 1,024, so words split differently)."""
    import json
    import os

    import model as M
    root = tmp_path_factory.mktemp("cross")
    world = str(root / "world")
    shapes.synthesize(world, seed=4, n_pretrain=32, n_instruct=64, n_images=32, n_sugarcrepe=2, n_vqa=4,
                      n_val_sugarcrepe=2, n_val_vqa=2, progress=False)
    with open(os.path.join(world, "instruct.json")) as f:
        samples = json.load(f)
    tok_t = shapes.train_tokenizer(shapes.tokenizer_corpus(samples), str(root / "tok_t"), vocab_size=600)
    teacher = M.from_preset("teacher", tok_t)  # seed 0: the same vision encoder as the student preset
    M.save_pretrained(teacher, str(root / "teacher"), tok_t)
    return world, str(root / "teacher"), root


def _cross_args(world, teacher, out, *extra):
    import os
    return ["--init", "preset:student", "--tokenizer", os.path.join(world, "tokenizer"), "--teacher", teacher,
            "--data", os.path.join(world, "instruct.json"), "--image-folder", world, "--out", out,
            "--global-batch", "8", "--micro-batch", "4", "--max-len", "256", "--lora-r", "4", "--lora-alpha", "8",
            "--lr", "1e-3", "--quiet", *extra]


def test_a_teacher_with_its_own_tokenizer_distils_a_student_end_to_end(cross_setup):
    import json
    import os

    world, teacher, root = cross_setup
    with pytest.raises(ValueError, match="tokenizers disagree"):  # the paper's L_KL: refused, as before
        train.main(["--stage", "2", "--max-steps", "1", *_cross_args(world, teacher, str(root / "refused"))])
    out = str(root / "cd")
    train.main(["--stage", "2", "--max-steps", "3", "--cross-vocab", "--save-every", "2",
                *_cross_args(world, teacher, out)])
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [r for r in map(json.loads, f) if "lm" in r]
    assert len(log) == 3
    assert all(r["kd"] > 0 and r["vat"] > 0 and r["kd_pairs"] > 0 for r in log)
    # kd_pairs of step 1 = the aligned pairs of that step's 8 samples, counted here from the conversations
    tok_s = data.load_tokenizer(os.path.join(world, "tokenizer"))
    tok_t = data.load_tokenizer(teacher)
    with open(os.path.join(world, "instruct.json")) as f:
        samples = json.load(f)
    first = data.GlobalBatchSampler(len(samples), 8, 0, 1, seed=0)
    idx = next(iter(first))
    n = 0
    for i in idx:
        msgs = data.llava_to_messages(samples[i])
        _, _, ks = data.answer_char_keys(tok_s, msgs, 16, data.image_token_id(tok_s))
        _, _, kt = data.answer_char_keys(tok_t, msgs, 16, data.image_token_id(tok_t))
        n += len([p for p in data.aligned_pairs(ks, kt) if p[0] < 256 and p[1] < 256])
    assert log[0]["kd_pairs"] == n
    state = runs.checkpoint_meta(os.path.join(out, "checkpoint"))
    assert state["cross_vocab"] is True
    # stage 3 after it, and the model saved with the student's tokenizer
    s3 = _cross_args(world, teacher, str(root / "s3"))
    s3[s3.index("preset:student")] = out  # --init: the stage-2 output
    train.main(["--stage", "3", "--max-steps", "1", *s3])
    assert os.path.exists(os.path.join(root, "s3", "model.safetensors"))


def _teacher_need(tok, s, nv):
    """(last visual position, first supervised position) of the teacher's rendering of sample s, from
    answer_char_keys (the path CrossVocabDataset.__getitem__ takes), not from the dataset's rendering."""
    ids, labels, _ = data.answer_char_keys(tok, data.llava_to_messages(s), nv, data.image_token_id(tok))
    vis = [j for j, t in enumerate(ids) if t == data.image_token_id(tok)]
    first = next(j for j, x in enumerate(labels) if x != -100)
    return max(vis[-1] if vis else -1, first) + 1, (vis[-1] if vis else -1)


def test_the_teachers_rendering_is_checked_against_max_len_before_training(cross_setup, capsys):
    """Issue 41 item 6: a sample whose TEACHER rendering puts its visual tokens past --max-len (here: text
    before the image, which the teacher's almost character-level tokenizer makes 5x longer) used to crash
    the run in __getitem__, hours in; --drop-overlong looked at the student's rendering only. Now both are
    checked when the dataset is built: an error with the count and the first ids, or dropped and counted."""
    import json
    import os

    import model as M
    from transformers import SiglipVisionConfig
    world, _, root = cross_setup
    tok_s = data.load_tokenizer(os.path.join(world, "tokenizer"))
    tok_c = shapes.train_tokenizer(shapes.world_vocabulary_corpus(), str(root / "tok_c"), vocab_size=262)
    with open(os.path.join(world, "instruct.json")) as f:
        samples = json.load(f)
    nv = 16
    max_len = max(_teacher_need(tok_c, s, nv)[0] for s in samples) + 4  # every sample fits as it is
    for s in samples[3:6]:  # three samples get text before the image
        s["conversations"][0]["value"] = "the red circle is left of the blue square. " * 8 + \
            s["conversations"][0]["value"]
    long_ids = [s["id"] for s in samples[3:6]]
    over = [s["id"] for s in samples if _teacher_need(tok_c, s, nv)[0] > max_len]
    assert over == long_ids and all(_teacher_need(tok_c, s, nv)[1] >= max_len for s in samples[3:6])
    proc = M.make_image_processor(SiglipVisionConfig(image_size=64, patch_size=16))
    student = data.SupervisedDataset(samples, tok_s, proc, world, nv, data.image_token_id(tok_s), max_len)
    assert student.dropped == []  # the student's rendering fits: only the teacher's does not
    with pytest.raises(ValueError, match=rf"3 samples do not fit --max-len {max_len} in the teacher's tokens .*"
                                         rf"first ids \['{long_ids[0]}', '{long_ids[1]}', '{long_ids[2]}'\].*"
                                         "--drop-overlong"):
        data.CrossVocabDataset(student, tok_s, tok_c, data.image_token_id(tok_c))
    ds = data.CrossVocabDataset(student, tok_s, tok_c, data.image_token_id(tok_c), drop_overlong=True)
    assert ds.dropped == ds.dropped_teacher == long_ids and len(ds) == len(samples) - 3
    assert [s["id"] for s in ds.samples] == [s["id"] for s in samples if s["id"] not in long_ids]
    for i in range(len(ds)):  # every item left renders (the check in __getitem__ no longer fires)
        assert ds[i]["id"] == ds.samples[i]["id"] and len(ds[i]["teacher_input_ids"]) <= max_len
    # through train.py: the error before any step, and --drop-overlong counting and naming the teacher's drops
    teacher = str(root / "teacher_c")
    M.save_pretrained(M.from_preset("teacher", tok_c), teacher, tok_c)
    data_file = str(root / "instruct_pretext.json")
    with open(data_file, "w") as f:
        json.dump(samples, f)
    out = str(root / "over")
    argv = ["--stage", "2", "--max-steps", "1", "--cross-vocab", *_cross_args(world, teacher, out)]
    argv[argv.index("--data") + 1] = data_file
    argv[argv.index("--max-len") + 1] = str(max_len)
    with pytest.raises(ValueError, match="3 samples do not fit"):
        train.main(argv)
    assert not os.path.exists(os.path.join(out, "checkpoint"))
    capsys.readouterr()
    train.main([*argv, "--drop-overlong", "--overwrite"])
    printed = capsys.readouterr().out
    assert "--drop-overlong: dropped 3 of 64 samples" in printed and "3 of them only in the teacher's tokens" in printed
    with open(os.path.join(out, "log.jsonl")) as f:
        start = json.loads(f.readline())
    assert start["dropped_overlong"] == 3
