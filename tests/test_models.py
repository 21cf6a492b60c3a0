"""Model zoo: presets, spec validation, taps, round-trips and parameter / MAC counts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trainables.models import PRESETS, SpecError, TapInfo, build_model, count_macs, count_params, resolve_spec


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, model.in_channels, model.image_size, model.image_size)


def test_cct_7_3x1_has_published_param_count() -> None:
    n = count_params(build_model({"preset": "cct_7_3x1"}))
    assert abs(n - 3.76e6) / 3.76e6 < 0.01, n


def test_cct_7_3x1_macs_match_analytic_count() -> None:
    model = build_model({"preset": "cct_7_3x1"})
    tokens, width, hidden, inner = 16 * 16, 256, 512, 4 * 64
    tokenizer = 32 * 32 * width * 3 * 3 * 3
    linears = tokens * (width * 3 * inner + inner * width + 2 * width * hidden)
    attention = 2 * tokens * tokens * inner  # q @ k^T and attn @ v over all heads
    pooling_and_head = tokens * width + width * 100
    expected = tokenizer + 7 * (linears + attention) + pooling_and_head
    assert count_macs(model) == expected
    assert 1.1e9 < expected < 1.25e9  # Compact-Transformers reports 1.19 G


def test_vgg_macs_match_analytic_count() -> None:
    model = build_model({"preset": "vgg11_cifar", "width_mult": 0.25})
    expected, size, c_in = 0, 32, 3
    for item in [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"]:
        if item == "M":
            size //= 2
        else:
            expected += size * size * c_in * item * 9
            c_in = item
    assert count_macs(model) == expected + 128 * 100


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_runs(name: str) -> None:
    model = build_model({"preset": name}).eval()
    spec = resolve_spec({"preset": name})
    assert model.spec == spec and model.num_classes == spec["num_classes"]
    assert model.image_size == spec["image_size"]
    with torch.no_grad():
        logits = model(_images(model))
    assert logits.shape == (2, spec["num_classes"])
    assert torch.isfinite(logits).all()


def test_cct_taps_shapes_kinds_and_order() -> None:
    model = build_model({"preset": "cct_narrow_lsmha"}).eval()  # 2 blocks, width 128, 16 x 8 heads
    names = ["tokenizer"]
    for i in range(2):
        names += [f"block.{i}.heads", f"block.{i}.ff_in", f"block.{i}.ff_hidden", f"block.{i}.out"]
    assert list(model.taps) == names + ["final_norm"]
    assert model.taps["block.1.heads"] == TapInfo("token", heads=16, head_dim=8)
    assert model.taps["tokenizer"].kind == "conv"

    x = _images(model)
    with torch.no_grad():
        logits, feats = model(x, taps=list(model.taps))
        assert torch.equal(logits, model(x))
    assert list(feats) == list(model.taps)
    assert feats["tokenizer"].shape == (2, 128, 16, 16)
    assert feats["block.0.heads"].shape == (2, 256, 16 * 8)
    assert feats["block.0.ff_hidden"].shape == (2, 256, 256)
    assert feats["block.1.out"].shape == (2, 256, 128)
    torch.testing.assert_close(model.norm(feats["block.1.out"]), feats["final_norm"])
    block = model.blocks["1"]  # ff_in is the normed FF input: block.out = residual + mlp(ff_in)
    residual = feats["block.1.out"] - block.mlp(feats["block.1.ff_in"])
    torch.testing.assert_close(block.norm2(residual), feats["block.1.ff_in"])


def test_heads_tap_is_head_major_attention_output() -> None:
    model = build_model({"preset": "cct_tiny", "pos_embedding": "sine"}).eval()
    with torch.no_grad():
        _, feats = model(_images(model), taps=["tokenizer", "block.0.heads"])
        block = model.blocks["0"]
        tokens = feats["tokenizer"].flatten(2).transpose(1, 2) + model.pos_embedding
        q, k, v = block.attn.qkv(block.norm1(tokens)).chunk(3, dim=-1)
        heads = []
        for h in range(2):
            cols = slice(16 * h, 16 * (h + 1))
            weights = (q[..., cols] @ k[..., cols].transpose(1, 2) / 16**0.5).softmax(-1)
            heads.append(weights @ v[..., cols])
    torch.testing.assert_close(feats["block.0.heads"], torch.cat(heads, dim=-1))


def _explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """softmax(q k^T / sqrt(d)) v written out: the reference for the fused SDPA kernel."""
    assert attn_mask is None and dropout_p == 0.0 and not is_causal
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q @ k.transpose(-2, -1) * scale).softmax(-1) @ v


@pytest.mark.parametrize(
    "overrides", [{"preset": "cct_7_3x1"}, {"preset": "cct_narrow", "heads": 16, "head_dim": 8, "n_conv_blocks": 1}]
)
def test_sdpa_attention_matches_explicit_attention(overrides: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tap and the logits agree to 1e-5 (fp32) whether attention runs through
    scaled_dot_product_attention or the explicit softmax formula."""
    model = build_model(overrides).eval()
    x = _images(model, 3)
    with torch.no_grad():
        fused_logits, fused = model(x, taps=list(model.taps))
        monkeypatch.setattr(F, "scaled_dot_product_attention", _explicit_attention)
        explicit_logits, explicit = model(x, taps=list(model.taps))
    for tap in model.taps:
        torch.testing.assert_close(fused[tap], explicit[tap], atol=1e-5, rtol=1e-5, msg=tap)
    torch.testing.assert_close(fused_logits, explicit_logits, atol=1e-5, rtol=1e-5)


def test_conv_blocks_replace_first_transformer_blocks() -> None:
    model = build_model({"preset": "cct_narrow", "blocks": 3, "n_conv_blocks": 2}).eval()
    assert list(model.taps) == [
        "tokenizer",
        "conv_block.0",
        "conv_block.1",
        "block.2.heads",
        "block.2.ff_in",
        "block.2.ff_hidden",
        "block.2.out",
        "final_norm",
    ]
    with torch.no_grad():
        _, feats = model(_images(model), taps=["conv_block.0", "conv_block.1", "block.2.out"])
    assert model.taps["conv_block.1"].kind == "conv"
    assert feats["conv_block.1"].shape == (2, 128, 16, 16)
    assert feats["block.2.out"].shape == (2, 256, 128)


def test_vgg_taps_and_classifier() -> None:
    model = build_model({"preset": "vgg11_afcc", "width_mult": 0.125}).eval()
    assert list(model.taps) == [f"conv.{i}" for i in range(10)]
    assert model.classifier.in_features == 64 * 2 * 2 and model.classifier.bias is None
    with torch.no_grad():
        _, feats = model(_images(model), taps=list(model.taps))
    channels = [8, 8, 16, 16, 32, 32, 32, 64, 64, 64]
    sizes = [32, 32, 16, 16, 8, 8, 8, 4, 4, 4]
    for i, (c, s) in enumerate(zip(channels, sizes)):
        assert feats[f"conv.{i}"].shape == (2, c, s, s)
        assert (feats[f"conv.{i}"] >= 0).all()  # after ReLU


def test_efficientnet_stage_taps() -> None:
    model = build_model({"preset": "efficientnet_b0", "num_classes": 10}).eval()
    assert list(model.taps) == [f"stage.{i}" for i in range(9)]
    with torch.no_grad():
        logits, feats = model(_images(model), taps=["stage.0", "stage.8"])
    assert logits.shape == (2, 10)
    assert feats["stage.0"].shape == (2, 32, 32, 32)  # stride-1 stem keeps 32 px
    assert feats["stage.8"].shape == (2, 1280, 2, 2)


def test_taps_argument_forms_and_hook_cleanup() -> None:
    model = build_model({"preset": "cct_tiny"}).eval()
    x = _images(model)
    logits, feats = model(x, taps=[])
    assert feats == {} and logits.shape == (2, 100)
    with pytest.raises(ValueError, match=r"tap 'nope': unknown \(known: tokenizer, "):
        model(x, taps=["block.0.out", "nope"])
    model(x, taps=["block.0.out"])
    assert not any(m._forward_hooks for m in model.modules())


def test_training_step_through_taps() -> None:
    model = build_model({"preset": "cct_tiny", "dropout": 0.1, "n_conv_blocks": 1, "blocks": 2})
    logits, feats = model(_images(model, 4), taps=["block.1.ff_hidden"])
    (F.cross_entropy(logits, torch.arange(4)) + feats["block.1.ff_hidden"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "spec",
    [
        {"preset": "cct_tiny", "n_conv_blocks": 1, "blocks": 2, "pos_embedding": "sine"},
        {"preset": "cct_tiny", "pos_embedding": "none", "seq_pool": False, "mlp_ratio": 1.5},
        {"preset": "vgg11_afcc", "width_mult": 0.125, "num_classes": 10},
    ],
)
def test_spec_and_state_dict_rebuild_model_exactly(spec: dict, tmp_path) -> None:
    resolved = resolve_spec(spec)
    assert resolve_spec(resolved) == resolved
    model = build_model(spec)
    model.train()
    model(_images(model, 4))  # move BatchNorm running statistics away from their init
    model.eval()
    (tmp_path / "spec.json").write_text(json.dumps(resolved))
    torch.save(model.state_dict(), tmp_path / "model.pt")

    rebuilt = build_model(json.loads((tmp_path / "spec.json").read_text()))
    rebuilt.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    rebuilt.eval()
    x = _images(model)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_resolved_presets_are_complete_json(name: str) -> None:
    resolved = resolve_spec({"preset": name})
    assert json.loads(json.dumps(resolved)) == resolved
    assert resolved["preset"] == name and resolved["family"] == PRESETS[name]["family"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"preset": "foo"}, "model.preset: unknown preset 'foo' (known: cct_7_3x1, "),
        ({"family": "x"}, "model.family: unknown family 'x'"),
        ({}, "model.family: unknown family None"),
        ({"preset": "cct_tiny", "family": "vgg"}, "model.family: 'vgg' conflicts with preset"),
        ({"preset": "cct_tiny", "heads": 0}, "model.heads: must be >= 1, got 0"),
        ({"preset": "cct_tiny", "head_dim": 0}, "model.head_dim: must be >= 1, got 0"),
        ({"preset": "cct_tiny", "heads": "4"}, "model.heads: must be an integer, got '4'"),
        ({"preset": "cct_narrow", "n_conv_blocks": 3}, "model.n_conv_blocks: 3 exceeds model.blocks (2)"),
        ({"preset": "cct_7_3x1", "image_size": 1}, "model.image_size: 1 is not usable by the tok"),
        ({"preset": "cct_7_3x1", "image_size": 2}, "model.image_size: 2 is not usable by the tok"),
        ({"preset": "cct_7_7x2", "image_size": 8}, "model.image_size: 8 is not usable by the tok"),
        ({"preset": "cct_tiny", "bogus": 1}, "model.bogus: unknown key for family cct"),
        ({"preset": "cct_tiny", "pos_embedding": "rope"}, "model.pos_embedding: must be one of"),
        ({"preset": "cct_tiny", "attn_dropout": 1.0}, "model.attn_dropout: must be in [0.0, 1.0)"),
        ({"preset": "cct_tiny", "pool": 1}, "model.pool: must be true or false"),
        ({"preset": "vgg11_cifar", "image_size": 36}, "model.image_size: 36 is not usable"),
        ({"preset": "vgg11_cifar", "layers": [64, "X"]}, "model.layers[1]: must be a positive integer"),
        ({"preset": "vgg11_cifar", "width_mult": 0}, "model.width_mult: must be > 0"),
        ({"preset": "efficientnet_b0", "num_classes": 0}, "model.num_classes: must be >= 1, got 0"),
        (["cct_tiny"], "model: expected a mapping"),
    ],
)
def test_bad_specs_name_the_field(spec, message: str) -> None:
    with pytest.raises(SpecError) as info:
        build_model(spec)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(message), str(info.value)
