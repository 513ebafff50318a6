"""lmms-eval model plugin (lmms-eval 0.7): the field's shared harness on our models (docs/evaluation.md, "lmms-eval").

    python lmms_plugin.py --model compodistill --model_args pretrained=runs/cd/stage3 --tasks mme,pope ...

runs lmms-eval's own command line with the model `compodistill` registered (lmms-eval 0.7 finds models in its
registry, `lmms_eval.models.MODEL_REGISTRY_V2`; `register()` adds ours there). `pretrained` is any model source
`model.load_any` reads: a run's model, RUN/checkpoint, an HF LLaVA directory, the authors' release layout.
Prompts are rendered as training rendered them (data.render_prompt: the model's chat template and recorded
system prompt, "<image>\\n" before the question); decoding is greedy (model.generate).
  generate_until  the answer, cut at the first of the task's `until` strings.
  loglikelihood   (sum of log P(continuation tokens | prompt), whether each is the greedy choice), the
                  continuation tokenized as an assistant turn is in training (its end-of-turn marker left out).
Only imported when asked for; lmms-eval is an optional dependency (a clear error when absent).
"""
import sys

try:
    from lmms_eval.api.model import lmms as _LMMS
except ImportError:  # the class below needs lmms-eval; register() / main() say how to get it
    _LMMS = object

LMMS_EVAL = "lmms-eval==0.7.3"


def _require():
    if _LMMS is object:
        raise ImportError(f"the lmms-eval plugin needs lmms-eval: pip install {LMMS_EVAL}")


class CompoDistill(_LMMS):
    """model_args: pretrained=SOURCE[,device=cpu|cuda][,dtype=float32|bfloat16|float16][,batch_size=N]
    [,system_prompt=TEXT|none]."""
    is_simple = True

    def __init__(self, pretrained: str, device: str = None, dtype: str = None, batch_size=1, system_prompt=None,
                 **kwargs):
        _require()
        super().__init__()
        import torch

        import data
        import model as M
        if kwargs:
            raise ValueError(f"compodistill: unknown model_args {sorted(kwargs)}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.mllm, self.tokenizer, self.processor = M.load_any(
            pretrained, device=self.device, dtype=getattr(torch, dtype) if dtype else None)
        self.mllm.eval()
        self.batch_size = int(batch_size)
        self.system_prompt = system_prompt if system_prompt is not None else self.mllm.extra_config.get("system_prompt")
        self.stop = data.end_of_turn_ids(self.tokenizer)

    # --- one request -> model inputs -------------------------------------------
    def _visual(self, doc_to_visual, doc_id, task, split):
        import evaluate
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"{task} doc {doc_id}: {len(visuals)} images; these models read one image per prompt")
        return evaluate.open_image(visuals[0]) if visuals else None

    def _messages(self, context, image, answer=None):
        import data
        content = (data.IMAGE_TOKEN + "\n" + context.replace(data.IMAGE_TOKEN, "").strip()) if image is not None else context
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return data.with_system_prompt(self.tokenizer, messages, self.system_prompt)

    def _pixels(self, image):
        if image is None:
            return None
        return self.processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device)

    # --- the lmms API --------------------------------------------------------------
    def generate_until(self, requests):
        import torch

        import data
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            image = self._visual(doc_to_visual, doc_id, task, split)
            ids = data.render_prompt(self.tokenizer, self._messages(context, image), self.mllm.num_visual_tokens,
                                     self.mllm.image_token_id, f"{task}/{doc_id}")
            ids = torch.tensor([ids], device=self.device)
            new = self.mllm.generate(ids, torch.ones_like(ids), self._pixels(image),
                                     max_new_tokens=int(gen_kwargs.get("max_new_tokens", 32)), eos_token_id=self.stop)[0]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text.strip())
        return out

    def loglikelihood(self, requests):
        import torch

        import data
        out = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self.task_dict[task][split][doc_id])
            image = self._visual(doc_to_visual, doc_id, task, split)
            ids, labels = data.render_conversation(self.tokenizer, self._messages(context, image, target),
                                                   self.mllm.num_visual_tokens, self.mllm.image_token_id,
                                                   f"{task}/{doc_id}")
            positions = [i for i, lab in enumerate(labels) if lab != data.IGNORE_INDEX]
            while positions and ids[positions[-1]] in self.stop:  # the end-of-turn marker is not the continuation
                positions.pop()
            if not positions:
                raise ValueError(f"{task} doc {doc_id}: the continuation {target!r} has no token")
            x = torch.tensor([ids], device=self.device)
            with torch.no_grad():
                logits = self.mllm(x, torch.ones_like(x), self._pixels(image))["logits"][0].float()
            logp = torch.log_softmax(logits[[p - 1 for p in positions]], dim=-1)
            targets = torch.tensor([ids[p] for p in positions], device=logp.device)
            score = float(logp.gather(1, targets[:, None]).sum())
            out.append(_passed_through((score, bool((logp.argmax(-1) == targets).all()))))
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("compodistill: multi-round generation is not supported")


def _passed_through(pair):
    """lmms-eval 0.7.3's evaluator passes every response through unwrap_generation_output, which turns a
    (log-likelihood, is_greedy) tuple into its str() and so breaks every loglikelihood task; a GenerationResult's
    .text comes back as it is."""
    from lmms_eval.api.instance import GenerationResult
    return GenerationResult(text=pair)


def register():
    """Add `compodistill` to lmms-eval's model registry (lmms-eval 0.7's ModelRegistryV2)."""
    _require()
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id="compodistill",
                                                      simple_class_path="lmms_plugin.CompoDistill"), overwrite=True)


def main(argv=None):
    """lmms-eval's command line, with `compodistill` registered."""
    try:
        _require()
    except ImportError as e:
        raise SystemExit(str(e)) from None
    register()
    from lmms_eval.__main__ import cli_evaluate
    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    return cli_evaluate()


if __name__ == "__main__":
    main()
