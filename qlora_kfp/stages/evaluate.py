"""Stage 4, evaluate: base vs tuned on the eval split (loss, perplexity, scored generations)."""

from __future__ import annotations

import html
import json
import logging
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

from qlora_kfp.configs import EvaluateConfig
from qlora_kfp.storage import artifacts
from qlora_kfp.storage.manifest import atomic_folder, check_output, verify
from qlora_kfp.storage.writes import output_lock
from qlora_kfp.training import heldout_loss, modeling

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    path: str
    metrics: dict
    samples: list[dict]


def normalize(text: str) -> str:
    """Lowercase, collapse white space and strip surrounding punctuation for exact match."""
    return re.sub(r"\s+", " ", text).strip().strip(".,;:!?\"'").lower()


class AnyScriptTokenizer:
    """Words of any script for ROUGE: rouge_score's default keeps only ``[a-z0-9]`` and scores
    identical Chinese, Arabic or emoji answers 0. Scripts written without spaces (Han, kana,
    Hangul) count one token per character; so does each emoji or other symbol (with its skin
    tone, variation selector or zero-width-joined parts); punctuation is no word."""

    CHAR_SCRIPTS = re.compile(
        r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]"
    )
    # A symbol with what modifies it: variation selectors, skin tones, ZWJ-joined symbols.
    SYMBOL = r"[^\s\w](?:[\ufe0e\ufe0f\U0001f3fb-\U0001f3ff]|\u200d[^\s\w])*"
    TOKEN = re.compile(rf"{CHAR_SCRIPTS.pattern}|[^\W_]+|{SYMBOL}")

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFC", text).casefold()
        return [
            t
            for t in self.TOKEN.findall(text)
            # punctuation, and a lone mark or joiner, are no words
            if unicodedata.category(t[0])[0] not in "PMC"
        ]


def rouge_l(reference: str, prediction: str) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=AnyScriptTokenizer())
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def generate(model, tokenizer, prompt: str | list[int], max_new_tokens: int) -> str:
    """Greedy answer to a rendered prompt (or its token ids, as prepare-dataset stored them:
    special-token text from the data stays text), ended by EOS or an end-of-turn token only,
    without special tokens (:func:`qlora_kfp.data.templates.answer_text`): end-of-turn text
    that an answer holds as text is part of it."""
    import torch

    from qlora_kfp.data.templates import answer_text, end_of_turn_ids, prompt_ids

    dev = next(model.parameters()).device
    ids = prompt if isinstance(prompt, list) else prompt_ids(tokenizer, prompt)
    ids = torch.tensor([ids], device=dev)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    return answer_text(tokenizer, out[0, ids.shape[1] :].tolist())


def score(samples: list[dict], who: str) -> dict:
    n = max(len(samples), 1)
    return {
        f"{who}_exact_match": round(sum(s[f"{who}_exact"] for s in samples) / n, 4),
        f"{who}_rougeL": round(sum(s[f"{who}_rougeL"] for s in samples) / n, 4),
    }


def samples_html(samples: list[dict], metrics: dict) -> str:
    """A self-contained HTML report: the metrics and the table of sample generations."""
    esc = html.escape
    head = "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in metrics.items())
    rows = "".join(
        f"<tr><td><pre>{esc(s['prompt'])}</pre></td><td>{esc(s['reference'])}</td>"
        f"<td>{esc(s['base_answer'])}</td><td>{esc(s['tuned_answer'])}</td>"
        f"<td>{'✔' if s['tuned_exact'] else '✘'}</td></tr>"
        for s in samples
    )
    return (
        "<html><head><meta charset='utf-8'><title>QLoRA evaluation</title><style>"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px}"
        "</style></head><body><h2>Base vs tuned</h2><table>" + head + "</table>"
        "<h2>Sample generations</h2><table><tr><th>prompt</th><th>reference</th>"
        "<th>base</th><th>tuned</th><th>tuned exact</th></tr>" + rows + "</table></body></html>"
    )


def run_evaluate(
    cfg: EvaluateConfig, model_dir: str, adapter_dir: str, dataset_dir: str, output_dir: str
) -> EvaluateResult:
    """Compare the 4-bit base with base+adapter on the eval split.

    Args:
        cfg: The stage configuration.
        model_dir: The quantized-model artifact the adapter was trained on.
        adapter_dir: The adapter artifact.
        dataset_dir: The prepared dataset artifact (its eval split is used).
        output_dir: Folder to create: ``metrics.json``, ``samples.jsonl``, ``report.html``,
            ``comparison.png``.

    Returns:
        Metrics with ``base_``/``tuned_`` prefixes and the sample generations.

    Raises:
        ProvenanceError: ``model_dir`` was quantized from another base than the adapter's.
        ProvenanceError: ``dataset_dir`` was tokenized for another model than ``model_dir``.
        ArtifactError: an adapter weight is NaN or Inf.
    """
    # Refuse an output that is not ours before any long work (atomic_folder checks again).
    check_output(output_dir, "evaluation", (model_dir, adapter_dir, dataset_dir))
    # One run at a time writes it: a second is refused here, before any work.
    with output_lock(output_dir):
        return _evaluate(cfg, model_dir, adapter_dir, dataset_dir, output_dir)


def _evaluate(
    cfg: EvaluateConfig, model_dir: str, adapter_dir: str, dataset_dir: str, output_dir: str
) -> EvaluateResult:
    from peft import PeftModel
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from qlora_kfp.tracking.plots import comparison_bars

    verify(model_dir, "quantized-model")
    verify(adapter_dir, "adapter")
    artifacts.check_finite_adapter(adapter_dir)
    # Base and tuned scores on another base of the same shapes would both be computed and both
    # be wrong: the adapter's deltas were learned for other weights.
    made = artifacts.base_model_of(model_dir)
    artifacts.check_base(
        adapter_dir,
        made["base_model_fingerprint"],
        f"{model_dir} (quantized from {made['base_model']})",
        "evaluate it on a quantized copy of the base it was trained on",
    )
    artifacts.check_tokenizer(
        dataset_dir,
        AutoTokenizer.from_pretrained(model_dir),
        f"{model_dir} (quantized from {made['base_model']})",
        "evaluate on a dataset prepared for the base model the adapter was trained on",
    )
    evals = modeling.take(artifacts.load_split(dataset_dir, "eval"), cfg.eval_rows)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = modeling.load_model(model_dir, dtype=modeling.resolve_dtype(cfg.compute_dtype))
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    metrics: dict = {}
    with model.disable_adapter():
        for k, v in heldout_loss.measure(model, evals, tokenizer, desc="base eval").items():
            metrics[f"base_eval_{k}"] = v
    for k, v in heldout_loss.measure(model, evals, tokenizer, desc="tuned eval").items():
        metrics[f"tuned_eval_{k}"] = v
    samples = []
    n = min(cfg.num_generations, len(evals))
    for row in tqdm(evals.select(range(n)), total=n, desc="generate", leave=False):
        s = {"prompt": row["prompt"], "reference": row["reference"]}
        prompt = row.get("prompt_ids") or row["prompt"]  # datasets prepared before: text only
        with model.disable_adapter():
            s["base_answer"] = generate(model, tokenizer, prompt, cfg.max_new_tokens)
        s["tuned_answer"] = generate(model, tokenizer, prompt, cfg.max_new_tokens)
        for who in ("base", "tuned"):
            s[f"{who}_exact"] = normalize(s[f"{who}_answer"]) == normalize(s["reference"])
            s[f"{who}_rougeL"] = round(rouge_l(s["reference"], s[f"{who}_answer"]), 4)
        samples.append(s)
    metrics.update(score(samples, "base"))
    metrics.update(score(samples, "tuned"))
    metrics["generations"] = n
    metrics["eval_loss_delta"] = round(metrics["tuned_eval_loss"] - metrics["base_eval_loss"], 6)
    with atomic_folder(output_dir, "evaluation") as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (tmp / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        (tmp / "report.html").write_text(samples_html(samples, metrics))
        (tmp / "evaluate.json").write_text(json.dumps({"config": asdict(cfg)}, indent=1))
        comparison_bars(
            {k[5:]: v for k, v in metrics.items() if k.startswith("base_")},
            {k[6:]: v for k, v in metrics.items() if k.startswith("tuned_")},
            ["eval_loss", "exact_match", "rougeL"],
            tmp / "comparison.png",
        )
    log.info("evaluated: %s", metrics)
    return EvaluateResult(str(output_dir), metrics, samples)


def read_metrics(folder: str | Path) -> dict:
    verify(folder, "evaluation")
    return json.loads((Path(folder) / "metrics.json").read_text())
