"""quantize, train, evaluate, merge on a tiny random Llama with real bitsandbytes 4-bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_kfp.configs import EvaluateConfig, MergeConfig, QuantizeConfig, TrainConfig
from qlora_kfp.errors import ConfigError, VerificationError
from qlora_kfp.storage.manifest import verify
from qlora_kfp.training import modeling


def linear4bit_modules(model):
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_quantized_artifact_reloads_as_nf4_double_quant(quantized):
    verify(quantized.path, "quantized-model")
    model = modeling.load_model(quantized.path)
    names = linear4bit_modules(model)
    assert len(names) == 14  # 2 layers x (q, k, v, o, gate, up, down); the head stays 16-bit
    w = dict(model.named_modules())[names[0]].weight
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested
    assert w.dtype == torch.uint8


def test_quantize_metrics_are_consistent(quantized):
    m = quantized.metrics
    # NF4 on Gaussian weights: ~9% relative error; far off means the wrong weights were compared.
    assert 0.03 < m["quant_rel_error"] < 0.2
    assert m["bytes_4bit"] < m["params"] * 4  # smaller than the float32 it was loaded as
    assert m["eval_perplexity_4bit"] > 0 and m["eval_perplexity_16bit"] > 0


@pytest.mark.parametrize("quant_type,double_quant", [("fp4", False), ("nf4", False)])
def test_quant_options_reach_bitsandbytes(quant_type, double_quant, demo_assets, tmp_path):
    from qlora_kfp.stages.quantize import run_quantize

    cfg = QuantizeConfig(
        base_model=demo_assets["base_model"], quant_type=quant_type, double_quant=double_quant
    )
    res = run_quantize(cfg, str(tmp_path / "q"))
    model = modeling.load_model(res.path)
    w = dict(model.named_modules())[linear4bit_modules(model)[0]].weight
    assert (w.quant_state.quant_type, w.quant_state.nested) == (quant_type, double_quant)
    assert "eval_perplexity_4bit" not in res.metrics  # no dataset given


@pytest.mark.slow
def test_training_changes_the_adapter_and_lowers_the_loss(trained):
    from safetensors.torch import load_file

    m = trained.metrics
    assert m["last_loss"] < 0.5 * m["first_loss"]
    weights = load_file(Path(trained.path) / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B starts at zero"
    cfg = json.loads((Path(trained.path) / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (Path(trained.path) / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_training_leaves_the_4bit_base_untouched(quantized, trained):
    from safetensors.torch import load_file

    # Re-reading the artifact proves the file on disk is untouched; the manifest's checksum
    # covers every byte of the packed 4-bit weights.
    verify(quantized.path, "quantized-model")
    before = load_file(Path(quantized.path) / "model.safetensors")
    model = modeling.load_model(quantized.path)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, trained.path)
    base_sd = peft_model.get_base_model().state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(base_sd[key.replace(".weight", ".base_layer.weight")].cpu(), before[key])


@pytest.mark.slow
def test_adapter_loads_with_plain_peft(quantized, trained):
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(trained.path)
    assert model.peft_config["default"].r == 16


def test_unknown_target_module_fails_before_training(quantized, prepared, tmp_path):
    from qlora_kfp.stages.train import run_train

    with pytest.raises(ConfigError, match=r"\['wq'\] are not in the model.*q_proj"):
        run_train(
            TrainConfig(target_modules="q_proj,wq"),
            quantized.path,
            prepared.path,
            str(tmp_path / "a"),
        )
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_named_targets_and_max_steps(quantized, prepared, tmp_path):
    from qlora_kfp.stages.train import run_train

    res = run_train(
        TrainConfig(
            target_modules="q_proj,v_proj", max_steps=3, lora_r=4, gradient_checkpointing=False
        ),
        quantized.path,
        prepared.path,
        str(tmp_path / "a"),
    )
    cfg = json.loads((Path(res.path) / "adapter_config.json").read_text())
    assert res.metrics["steps"] == 3
    assert {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {"q_proj", "v_proj"}


@pytest.mark.slow
def test_tuned_beats_base_on_the_eval_split(quantized, trained, prepared, tmp_path):
    from qlora_kfp.stages.evaluate import run_evaluate

    res = run_evaluate(
        EvaluateConfig(num_generations=8, max_new_tokens=8),
        quantized.path,
        trained.path,
        prepared.path,
        str(tmp_path / "ev"),
    )
    m = res.metrics
    assert m["tuned_eval_loss"] < 0.5 * m["base_eval_loss"]
    assert m["tuned_rougeL"] >= m["base_rougeL"]
    assert len(res.samples) == 8 and {"prompt", "reference", "base_answer", "tuned_answer"} <= set(
        res.samples[0]
    )
    html = (Path(res.path) / "report.html").read_text()
    assert res.samples[0]["reference"] in html


@pytest.mark.parametrize(
    "ref,pred,exact",
    [
        ("cold", "cold", True),
        ("cold", " Cold.", True),
        ("cold", "colder", False),
        ("a b", "a  b", True),
    ],
    ids=["same", "case-and-punctuation", "different-word", "spaces"],
)
def test_exact_match_normalization(ref, pred, exact):
    from qlora_kfp.stages.evaluate import normalize, rouge_l

    assert (normalize(ref) == normalize(pred)) is exact
    assert rouge_l(ref, pred) == pytest.approx(1.0) if exact else rouge_l(ref, pred) < 1.0


@pytest.mark.slow
def test_merged_logits_equal_base_plus_adapter(demo_assets, trained, tmp_path):
    from peft import PeftModel

    from qlora_kfp.stages.merge import run_merge

    res = run_merge(
        MergeConfig(base_model=demo_assets["base_model"], merge_dtype="float32"),
        trained.path,
        str(tmp_path / "merged"),
    )
    assert res.metrics["merge_max_abs_diff"] <= 1e-3
    merged = modeling.load_model(res.path, dtype=torch.float32)
    assert not linear4bit_modules(merged) and not any(
        "lora" in n for n, _ in merged.named_parameters()
    )
    base = modeling.load_model(demo_assets["base_model"], dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, trained.path)
    ids = torch.randint(
        0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-3)


@pytest.mark.slow
def test_merged_weights_are_sharded_at_the_stage_shard_size(
    demo_assets, trained, tmp_path, monkeypatch
):
    """Shards of SHARD_SIZE, not transformers' 50 GB default, which sits at the edge of what
    KFP's launcher can upload as one object (5 MiB parts x 10,000)."""
    from qlora_kfp.stages.merge import run_merge
    from qlora_kfp.storage import manifest

    monkeypatch.setattr(manifest, "SHARD_SIZE", "200KB")
    res = run_merge(MergeConfig(base_model=demo_assets["base_model"]), trained.path, str(tmp_path))
    shards = sorted(Path(res.path).glob("model-*.safetensors"))
    assert len(shards) > 1 and (Path(res.path) / "model.safetensors.index.json").is_file()
    merged = modeling.load_model(res.path, dtype=torch.float32)
    assert merged.config.vocab_size > 0


@pytest.mark.slow
def test_merge_refuses_to_save_when_logits_differ(demo_assets, trained, tmp_path, monkeypatch):
    """The written weights are peft's merge cast to merge_dtype, bit for bit on the CPU (the
    difference is 0): a delta 1% off must fail the check."""
    from qlora_kfp.stages.merge import run_merge
    from qlora_kfp.training import lora_delta

    delta = lora_delta.delta_weight
    monkeypatch.setattr(lora_delta, "delta_weight", lambda *a: delta(*a) * 1.01)
    with pytest.raises(VerificationError, match="was not saved"):
        run_merge(
            MergeConfig(base_model=demo_assets["base_model"]),
            trained.path,
            str(tmp_path / "merged"),
        )
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    "logs",
    [{"loss": float("nan")}, {"loss": 1.0, "grad_norm": float("inf")}],
    ids=["nan-loss", "inf-grad-norm"],
)
def test_non_finite_loss_stops_training(logs):
    from transformers import TrainerControl, TrainerState

    from qlora_kfp.training.trainer_hooks import recorder

    history, diverged = [], []
    cb = recorder(history, [0], diverged)
    cb.on_train_begin(None, TrainerState(), TrainerControl())
    state = TrainerState()
    state.global_step = 7
    control = cb.on_log(None, state, TrainerControl(), logs=logs)
    assert control.should_training_stop and "at step 7" in diverged[0]


@pytest.mark.slow
def test_diverged_training_writes_no_adapter(quantized, prepared, tmp_path, monkeypatch):
    from qlora_kfp.errors import TrainingDivergedError
    from qlora_kfp.stages.train import run_train
    from qlora_kfp.training import trainer_hooks

    real = trainer_hooks.recorder

    def poisoned(history, tokens, diverged, on_log=None, ranks=1):  # a run whose 2nd loss is NaN
        cb = real(history, tokens, diverged, on_log, ranks)
        on_log = cb.on_log

        def patched(args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.global_step >= 2:
                logs = {**logs, "loss": float("nan")}
            return on_log(args, state, control, logs=logs, **kw)

        cb.on_log = patched
        return cb

    monkeypatch.setattr(trainer_hooks, "recorder", poisoned)
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 2"):
        run_train(
            TrainConfig(max_steps=20, logging_steps=1),
            quantized.path,
            prepared.path,
            str(tmp_path / "a"),
        )
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "fp32_upcast,embed_dtype",
    [
        pytest.param(False, torch.bfloat16, id="16-bit-weights-stay-16-bit"),
        pytest.param(True, torch.float32, id="peft-style-float32-upcast"),
    ],
)
def test_prepare_model_freezes_the_base_and_casts_only_when_asked(
    quantized, fp32_upcast, embed_dtype
):
    from qlora_kfp.training.peft_model import prepare_model

    model = modeling.load_model(quantized.path)
    for p in model.parameters():  # as a GPU loads them: 16-bit beside the packed 4-bit weights
        if p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
    model = prepare_model(model, TrainConfig(fp32_upcast=fp32_upcast))
    assert model.get_input_embeddings().weight.dtype == embed_dtype
    assert model.model.norm.weight.dtype == embed_dtype
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing


@pytest.mark.slow
def test_a_nan_adapter_is_never_sealed(quantized, prepared, tmp_path, monkeypatch):
    """Finite losses, NaN weights (what an extreme weight decay does): no adapter, an error."""
    import torch

    from qlora_kfp.errors import TrainingDivergedError
    from qlora_kfp.stages.train import run_train
    from qlora_kfp.training import trainer_hooks

    real = trainer_hooks.recorder

    def poisoned(history, tokens, diverged, on_log=None, ranks=1):
        cb = real(history, tokens, diverged, on_log, ranks)

        def on_train_end(args, state, control, model=None, **kw):
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))

        cb.on_train_end = on_train_end
        return cb

    monkeypatch.setattr(trainer_hooks, "recorder", poisoned)
    with pytest.raises(TrainingDivergedError, match="adapter weights are NaN or Inf"):
        run_train(
            TrainConfig(max_steps=2, logging_steps=1, checkpoint_steps=0),
            quantized.path,
            prepared.path,
            str(tmp_path / "a"),
        )
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule,warmup,first_lrs",
    [
        pytest.param("constant", 0.5, [0.0, 5e-4, 1e-3, 1e-3], id="constant-with-warmup"),
        pytest.param("constant", 0.0, [1e-3, 1e-3, 1e-3, 1e-3], id="constant-without-warmup"),
        pytest.param("linear", 0.5, [0.0, 5e-4, 1e-3, 5e-4], id="linear-with-warmup"),
    ],
)
def test_warmup_applies_to_every_schedule(
    quantized, prepared, tmp_path, schedule, warmup, first_lrs
):
    """transformers' own ``constant`` ignores warmup; a warmup_ratio given is a warmup wanted."""
    from qlora_kfp.stages.train import run_train

    res = run_train(
        TrainConfig(
            lr_scheduler=schedule,
            warmup_ratio=warmup,
            learning_rate=1e-3,
            max_steps=4,
            logging_steps=1,
            checkpoint_steps=0,
        ),
        quantized.path,
        prepared.path,
        str(tmp_path / "a"),
    )
    lrs = [row["learning_rate"] for row in res.history if "learning_rate" in row]
    assert lrs == pytest.approx(first_lrs)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("rich", id="english"),
        pytest.param("富有的人", id="chinese"),
        pytest.param("غني جدا", id="arabic"),
        pytest.param("богатый человек", id="russian"),
        pytest.param("お金持ち", id="japanese"),
        pytest.param("부자 입니다", id="korean"),
        pytest.param("🎉", id="one-emoji"),
        pytest.param("🎉🎂 👍🏽", id="emoji-with-skin-tone"),
        pytest.param("❤️", id="emoji-with-variation-selector"),
        pytest.param("👨‍👩‍👧", id="emoji-family-zwj"),
        pytest.param("生日快乐 🎂", id="chinese-and-emoji"),
        pytest.param("→ ∞ €", id="symbols"),
    ],
)
def test_identical_answers_score_perfectly_in_any_script(text):
    from qlora_kfp.stages.evaluate import normalize, rouge_l

    assert rouge_l(text, text) == 1.0
    assert rouge_l(text, "something else entirely") < 0.5
    assert normalize(text + ".") == normalize(text)


@pytest.mark.parametrize(
    "reference,prediction,expected",
    [
        pytest.param("🎉 party 🎂", "🎉 🎂", 0.8, id="emoji-count-as-words"),
        pytest.param("🎉🎂", "🎂🎉", 0.5, id="emoji-order-counts"),
        pytest.param("生日快乐", "生日", 2 / 3, id="chinese-characters"),
        pytest.param("yes!", "yes", 1.0, id="punctuation-is-no-word"),
    ],
)
def test_rouge_counts_emoji_and_symbols_as_words(reference, prediction, expected):
    from qlora_kfp.stages.evaluate import rouge_l

    assert rouge_l(reference, prediction) == pytest.approx(expected)


class ScriptedModel(torch.nn.Module):
    """Answers with fixed token ids, stopping where transformers' ``generate`` would: after an
    id of ``eos_token_id``, or once the text ends with one of ``stop_strings``."""

    def __init__(self, answer: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer = answer

    def generate(self, input_ids, max_new_tokens, eos_token_id=None, stop_strings=None, **kw):
        stop = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        out: list[int] = []
        for t in self.answer[:max_new_tokens]:
            out.append(t)
            text = kw["tokenizer"].decode(out) if stop_strings else ""
            if t in stop or any(text.endswith(s) for s in stop_strings or ()):
                break
        return torch.cat([input_ids, torch.tensor([out], dtype=input_ids.dtype)], dim=1)


def text_ids(tokenizer, text: str) -> list[int]:
    """``text`` as a row's answer is tokenized: special-token strings in it stay plain text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


END = object()  # the tokenizer's real end-of-turn token (the demo's EOS, <|im_end|>)


@pytest.mark.parametrize(
    "template_end,answer,expected",
    [
        pytest.param(None, ["cold", END, "junk"], "cold", id="the-real-end-token-ends-it"),
        pytest.param(None, ["cold"], "cold", id="no-end-token"),
        pytest.param(
            None,
            ["close a turn with <|im_end|> and go on", END],
            "close a turn with <|im_end|> and go on",
            id="end-token-text-inside-the-answer",
        ),
        pytest.param(
            None, ["it is <|im_end|>", END], "it is <|im_end|>", id="end-token-text-at-the-end"
        ),
        pytest.param(
            None,
            ["</s> or <|eot_id|> or <end_of_turn>", END],
            "</s> or <|eot_id|> or <end_of_turn>",
            id="other-templates-markers-as-text",
        ),
        pytest.param(
            "<|end|>", ["rich<|end|>\n", END], "rich", id="template-marker-the-tokenizer-lacks"
        ),
        pytest.param(
            "<|end|>",
            ["a <|end|> b<|end|>\n", END],
            "a <|end|> b",
            id="template-marker-text-inside-the-answer",
        ),
    ],
)
def test_only_the_end_of_turn_ends_an_answer(tokenizer, template_end, answer, expected):
    """An answer holding end-of-turn text as text (trained on as text: data.specials) is
    evaluated whole; a template whose end marker is no token of the tokenizer writes it as
    text, and that text is dropped where the template puts it, at the answer's end."""
    import copy

    from qlora_kfp.stages.evaluate import generate

    tok = copy.deepcopy(tokenizer)
    if template_end:
        tok.chat_template = tokenizer.chat_template.replace("<|im_end|>", template_end)
    ids = [
        i for part in answer for i in ([tok.eos_token_id] if part is END else text_ids(tok, part))
    ]
    assert generate(ScriptedModel(ids), tok, [0, 5, 6], max_new_tokens=64) == expected
