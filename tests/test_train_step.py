"""One optimizer step: gradient accumulation, mixed precision with a GradScaler, static shapes and compile."""
from __future__ import annotations

import math

import pytest
import torch

from rsam.build import build_rsam
from rsam.config import compose_config
from rsam.data.batch import Collator, ImageSample
from rsam.data.tokenizer import RSAMTokenizer
from rsam.losses import RSAMLoss
from tiny_rsam_setup import TINY_CONFIG, write_vocab
from training.optimizer import OptimConfig, ScheduledOptimizer, plan_param_groups
from training.precision import resolve_precision
from training.step import TrainStep
from training.trainer import parse_section

R = 64
WORDS = "the a red white blue ship plane tank building left right top bottom small large near".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt", WORDS)
    return RSAMTokenizer(str(vocab), mode="standard", max_tokens=12)


def samples(n_images: int, seed: int, exprs=(1, 3)):
    """Synthetic per-image samples with 1..3 expressions of varying length, some no-target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_images):
        k = int(torch.randint(exprs[0], exprs[1] + 1, (1,), generator=g))
        masks = torch.zeros(k, R, R, dtype=torch.bool)
        texts = []
        for j in range(k):
            y, x = (int(v) for v in torch.randint(0, R // 2, (2,), generator=g))
            if (i + j) % 4 != 3:  # every fourth expression refers to nothing
                masks[j, y:y + R // 3, x:x + R // 4] = True
            n_words = int(torch.randint(1, 8, (1,), generator=g))
            texts.append(" ".join(WORDS[int(w)] for w in torch.randint(0, len(WORDS), (n_words,), generator=g)))
        out.append(ImageSample(name=f"img{seed}_{i}", image=torch.randint(0, 256, (3, R, R), generator=g,
                                                                           dtype=torch.uint8),
                               masks=masks, descriptions=texts, categories=["c"] * k, annotation_ids=list(range(k)),
                               is_negative=[not bool(m.any()) for m in masks], orig_size=(R, R)))
    return out


def tiny_model(*overrides: str):
    torch.manual_seed(0)
    cfg = compose_config(TINY_CONFIG, [f"scratch.resolution={R}", *overrides])
    model = build_rsam(cfg.model, mode="train").eval()  # eval: no dropout, so micro-batches draw no randomness
    return model, cfg


def sgd_step(model, cfg, amp_dtype=None, grad_scaler=None, clip=None, net=None):
    """A TrainStep with plain SGD (linear in the gradient, so accumulated and whole steps compare tightly)."""
    plan = plan_param_groups(model, parse_section(OptimConfig, cfg.optim, "optim"))
    params = dict(model.named_parameters())
    sgd = torch.optim.SGD([{"name": s.name, "params": [params[n] for n in s.param_names]} for s in plan], lr=0.0)
    opt = ScheduledOptimizer(sgd, plan)
    return TrainStep(model if net is None else net, RSAMLoss(reduce_across_ranks=False), opt, clip, amp_dtype, grad_scaler=grad_scaler)


def test_accumulated_2x4_step_equals_one_8_image_step(tokenizer):
    images = samples(8, seed=3)
    whole = Collator(tokenizer)(images)
    micro = [Collator(tokenizer)(images[:4]), Collator(tokenizer)(images[4:])]
    assert micro[0].num_expressions != micro[1].num_expressions  # unequal counts: normalisation matters
    model_a, cfg = tiny_model()
    model_b, _ = tiny_model()
    losses_a = sgd_step(model_a, cfg, clip=1.0)(whole, 0.3)
    losses_b = sgd_step(model_b, cfg, clip=1.0)(micro, 0.3)
    for k in losses_a:
        torch.testing.assert_close(losses_b[k], losses_a[k], rtol=1e-5, atol=1e-6)
    moved = 0
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7, msg=name)
    ref, _ = tiny_model()
    moved = sum(not torch.equal(p, q) for p, q in zip(model_a.parameters(), ref.parameters()))
    assert moved > 100  # the step really changed the weights


def test_float16_autocast_uses_the_grad_scaler_and_skips_non_finite_steps(tokenizer):
    batch = Collator(tokenizer)(samples(4, seed=5))
    model, cfg = tiny_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    step = sgd_step(model, cfg, amp_dtype=torch.float16, grad_scaler=scaler, clip=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    losses = step(batch, 0.0)
    assert math.isfinite(float(losses["core_loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # an overflowing step: the scaler skips it and halves the scale
    step.loss_fn = _Overflow(step.loss_fn)
    after_good = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    step(batch, 0.0)
    assert all(torch.equal(a, p) for a, p in zip(after_good, model.parameters()))
    assert scaler.get_scale() == scale / 2


class _Overflow(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        losses = self.inner(*args, **kwargs)
        losses["core_loss"] = losses["core_loss"] * float("inf")
        return losses


def test_precision_is_chosen_per_device(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision(True, "auto", cpu) == (None, False)
    assert resolve_precision(False, "auto", gpu) == (None, False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: True)
    assert resolve_precision(True, "auto", gpu) == (torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: False)  # V100, T4
    assert resolve_precision(True, "auto", gpu) == (torch.float16, True)
    assert resolve_precision(True, "float16", cpu) == (torch.float16, True)
    with pytest.raises(ValueError, match="auto, bfloat16 or float16"):
        resolve_precision(True, "float8", gpu)


def test_static_shape_batches_pad_without_changing_the_loss(tokenizer):
    images = samples(4, seed=7)
    plain = Collator(tokenizer, max_expressions_per_batch=10)(images)
    static = Collator(tokenizer, max_expressions_per_batch=10, static_shapes=True)(images)
    assert static.input_ids.shape == (10, 12) and plain.num_expressions < 10
    assert static.num_valid == plain.num_expressions == int(static.expr_valid.sum())
    model, _ = tiny_model()
    loss_fn = RSAMLoss(reduce_across_ranks=False)
    with torch.no_grad():
        a = loss_fn(model(plain.images, plain.expr_to_image, plain.input_ids, plain.attention_mask), plain.masks)
        out = model(static.images, static.expr_to_image, static.input_ids, static.attention_mask)
        b = loss_fn(out, static.masks, valid=static.expr_valid)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="standard"):
        Collator(RSAMTokenizer(tokenizer.vocab_path, mode="official"), 10, static_shapes=True)


def test_compiled_training_step_does_not_recompile_and_matches_eager(tokenizer):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    collate = Collator(tokenizer, max_expressions_per_batch=9, static_shapes=True)
    batches = [collate(samples(3, seed=s)) for s in (11, 12, 13, 14)]
    counts = {(b.num_valid, int(b.attention_mask[:b.num_valid].sum(1).max())) for b in batches}
    assert len(counts) >= 3  # different expression counts and text lengths
    eager_model, cfg = tiny_model()
    compiled_model, _ = tiny_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_model, backend=counter, dynamic=False)
    eager_step, compiled_step = sgd_step(eager_model, cfg), sgd_step(compiled_model, cfg, net=compiled)
    frames = []
    for batch in batches:
        a, b = eager_step(batch, 0.5), compiled_step(batch, 0.5)
        torch.testing.assert_close(b["core_loss"], a["core_loss"], rtol=1e-4, atol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == [frames[0]] * len(batches)  # compiled once, never again
