"""Pruning: mask rules, random controls, enforcement through training and save/load, the job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_job
from torch.nn.utils import prune

from analysis.pruning.cli import main as prune_main
from analysis.pruning.cli import split_config
from analysis.pruning.job import PruneConfig, PrunePlan, run_prune_job, unit_label_sets
from analysis.pruning.masks import (
    Connection,
    PruneError,
    apply_masks,
    connection_l1,
    connection_mask,
    dilution,
    emptied_units,
    expand,
    full_masks,
    layer_connections,
    load_masks,
    magnitude_connections,
    model_masks,
    output_mask,
    plan_layers,
    random_at_level,
    random_connections,
    random_label_sets,
    rebuild_pruned,
    save_masks,
    structured_connections,
)
from analysis.units.pipeline import AnalysisConfig
from analysis.units.results import load_label_sets
from trainables.config import prepare
from trainables.models import build_model
from trainables.probs import read_probs
from trainables.schema import InputError
from trainables.train import run_job

T, F_ = True, False
TINY_VGG = {"preset": "vgg11_afcc", "width_mult": 0.0625, "num_classes": 5}  # widths 4 .. 32, 2x2 map
TINY_CCT = {"preset": "cct_tiny", "blocks": 2, "num_classes": 5, "image_size": 16}


def sets(*units):
    return [set(u) for u in units]


# ---------------------------------------------------------------- rules


def test_intersection_and_output_rules_exact():
    ins = sets({0, 1}, {2}, set())
    outs = sets({1}, {2, 3}, {0, 2}, set())
    assert connection_mask(ins, outs).tolist() == [[T, F_, F_], [F_, T, F_], [T, T, F_], [F_, F_, F_]]
    assert output_mask(ins, 4).tolist() == [[T, F_, F_], [T, F_, F_], [F_, T, F_], [F_, F_, F_]]
    fc = expand(output_mask(ins, 4), (4, 3 * 2), "fc")  # each filter owns 2 contiguous inputs
    assert fc[0].tolist() == [T, T, F_, F_, F_, F_] and fc[2].tolist() == [F_, F_, T, T, F_, F_]
    conv = expand(connection_mask(ins, outs), (4, 3, 3, 3), "conv")
    assert torch.equal(conv, connection_mask(ins, outs)[:, :, None, None].expand(4, 3, 3, 3))
    assert dilution(connection_mask(ins, outs)) == pytest.approx(1 - 4 / 12)
    with pytest.raises(PruneError, match="do not fit"):
        expand(connection_mask(ins, outs), (4, 5), "blocks.0.mlp.fc1.weight")
    with pytest.raises(PruneError, match="label 4"):
        output_mask(sets({4}), 4)


def test_afcc_plan_and_masks_on_vgg():
    model = build_model({**TINY_VGG, "image_size": 32})
    layers = plan_layers(model, "afcc")
    assert [(l.inputs, l.outputs) for l in layers] == [(f"conv.{i}", f"conv.{i + 1}") for i in range(9)] + [
        ("conv.9", None)
    ]
    params = dict(model.named_parameters())
    widths = [4, 4, 8, 8, 16, 16, 16, 32, 32, 32]
    for i, l in enumerate(layers[:-1]):
        assert params[l.param].shape[:2] == (widths[i + 1], widths[i])
    label_sets = {f"conv.{i}": [{u % 5} for u in range(w)] for i, w in enumerate(widths)}
    masks = full_masks(model, layer_connections(layers, label_sets, 5))
    conv = masks[layers[3].param]  # conv.3 (8) -> conv.4 (16)
    expected = torch.tensor([[j % 5 == i % 5 for i in range(8)] for j in range(16)])
    assert torch.equal(conv, expected[:, :, None, None].expand(16, 8, 3, 3))
    fc = masks["classifier.weight"]  # 32 filters x 2x2 positions -> 5 outputs
    expected = torch.tensor([[j == f % 5 for f in range(32) for _ in range(4)] for j in range(5)])
    assert torch.equal(fc, expected)
    assert [l.inputs for l in plan_layers(model, "afcc", start_tap="conv.7")] == ["conv.7", "conv.8", "conv.9"]
    with pytest.raises(PruneError, match="label sets: missing taps"):
        layer_connections(layers, {"conv.0": label_sets["conv.0"]}, 5)


def test_nodal_plan_and_masks_between_fc_layers():
    model = build_model({**TINY_VGG, "fc_hidden": [128, 96]})  # 8 and 6 FC nodes after the 32 filters
    assert list(model.taps)[-2:] == ["fc.0", "fc.1"]
    assert plan_layers(model, "afcc")[-1] == Connection("fc.0.linear.weight", "conv.9", "fc.0")
    layers = plan_layers(model, "nodal")
    assert layers == [Connection("fc.1.linear.weight", "fc.0", "fc.1"), Connection("classifier.weight", "fc.1", None)]
    label_sets = {"fc.0": [{u % 5} for u in range(8)], "fc.1": [{u % 5, (u + 1) % 5} for u in range(6)]}
    masks = full_masks(model, layer_connections(layers, label_sets, 5))
    expected = torch.tensor([[bool(label_sets["fc.0"][i] & label_sets["fc.1"][j]) for i in range(8)] for j in range(6)])
    assert torch.equal(masks["fc.1.linear.weight"], expected)
    assert torch.equal(masks["classifier.weight"], output_mask(label_sets["fc.1"], 5))
    with pytest.raises(PruneError, match="method: 'nodal' does not apply to a vgg model \\(use 'afcc'\\)"):
        plan_layers(build_model(TINY_VGG), "nodal")  # no hidden FC layers


def test_andc_plan_and_masks_on_cct():
    model = build_model(TINY_CCT)  # width 32, hidden 64
    layers = plan_layers(model, "andc")
    assert [(l.param, l.inputs, l.outputs) for l in layers] == [
        ("blocks.0.mlp.fc1.weight", "block.0.ff_in", "block.0.ff_hidden"),
        ("blocks.0.mlp.fc2.weight", "block.0.ff_hidden", "block.0.out"),
        ("blocks.1.mlp.fc1.weight", "block.1.ff_in", "block.1.ff_hidden"),
        ("blocks.1.mlp.fc2.weight", "block.1.ff_hidden", "block.1.out"),
    ]
    label_sets = {
        t: [{u % 3, 4} if u % 7 == 0 else {u % 3} for u in range(64 if "hidden" in t else 32)]
        for t in ("block.0.ff_in", "block.0.ff_hidden", "block.0.out")
    }
    masks = full_masks(model, layer_connections(layers[:2], label_sets, 5))
    fc1 = masks["blocks.0.mlp.fc1.weight"]
    assert fc1.shape == (64, 32)
    for j, i in [(0, 0), (0, 3), (1, 4), (7, 14), (2, 1)]:
        keep = bool(label_sets["block.0.ff_in"][i] & label_sets["block.0.ff_hidden"][j])
        assert bool(fc1[j, i]) == keep
    with pytest.raises(PruneError, match="method: 'afcc' does not apply to a cct model"):
        plan_layers(model, "afcc")
    with pytest.raises(PruneError, match="start_tap: unknown tap"):
        plan_layers(model, "andc", start_tap="block.9.out")


def test_random_controls_keep_per_layer_dilution():
    gen = torch.Generator().manual_seed(0)
    conns = {"a": torch.rand(20, 30, generator=gen) > 0.8, "b": torch.rand(10, 7, generator=gen) > 0.3}
    rand = random_connections(conns, seed=1)
    for p in conns:
        assert rand[p].shape == conns[p].shape and int(rand[p].sum()) == int(conns[p].sum())
        assert not torch.equal(rand[p], conns[p])
    assert all(torch.equal(rand[p], random_connections(conns, seed=1)[p]) for p in conns)
    assert dilution(random_at_level((40, 25), 0.75, gen)) == 0.75
    labels = random_label_sets({"t": 6, "u": 3}, num_labels=10, k=5, seed=2)
    assert [len(s) for s in labels["t"] + labels["u"]] == [5] * 9
    assert all(s <= set(range(10)) for s in labels["t"])
    with pytest.raises(PruneError, match="random_labels_k"):
        random_label_sets({"t": 6}, num_labels=4, k=5)


def test_magnitude_baselines_match_l1_unstructured_at_the_guided_dilution():
    """Per layer: the connections of largest L1 norm, as many as the guided mask keeps, exactly what
    torch's l1_unstructured prunes on the connections' L1 norms; global: one threshold, same total."""
    torch.manual_seed(0)
    conv, fc = torch.nn.Conv2d(6, 8, 3), torch.nn.Linear(5 * 4, 3)  # a classifier over 5 units x 4 positions
    model = torch.nn.ModuleDict({"conv": conv, "fc": fc})
    gen = torch.Generator().manual_seed(1)
    guided = {"conv.weight": torch.rand(8, 6, generator=gen) > 0.6, "fc.weight": torch.rand(3, 5, generator=gen) > 0.4}
    kept = magnitude_connections(model, guided)
    for path, weight in (("conv.weight", conv.weight), ("fc.weight", fc.weight)):
        scores = connection_l1(weight, guided[path].shape)
        holder = torch.nn.Linear(1, 1)
        holder.weight = torch.nn.Parameter(scores.clone())
        prune.l1_unstructured(holder, "weight", amount=int((~guided[path]).sum()))
        assert torch.equal(kept[path], holder.weight_mask.bool()), path
        assert int(kept[path].sum()) == int(guided[path].sum())
    assert torch.allclose(connection_l1(conv.weight, (8, 6)), conv.weight.detach().abs().sum(dim=(2, 3)))
    assert torch.allclose(connection_l1(fc.weight, (3, 5))[:, 0], fc.weight.detach().abs()[:, :4].sum(1))
    both = magnitude_connections(model, guided, per_layer=False)
    budget = 9 * int(guided["conv.weight"].sum()) + 4 * int(guided["fc.weight"].sum())  # parameters kept
    assert budget - 9 < 9 * int(both["conv.weight"].sum()) + 4 * int(both["fc.weight"].sum()) <= budget
    per_entry = torch.cat(
        [connection_l1(conv.weight, (8, 6)).flatten() / 9, connection_l1(fc.weight, (3, 5)).flatten() / 4]
    )
    chosen = torch.cat([both["conv.weight"].flatten(), both["fc.weight"].flatten()])
    assert per_entry[chosen].min() >= per_entry[~chosen].max()


def test_structured_twin_removes_the_emptied_count_of_smallest_l1_units():
    """Brute force: at each inner tap the guided mask empties some units; the twin removes as many
    whole units, those whose incoming weights have the smallest summed |w|, in and out."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"a": torch.nn.Conv2d(3, 6, 3), "b": torch.nn.Conv2d(6, 5, 3), "fc": torch.nn.Linear(5 * 4, 4)}
    )
    layers = [
        Connection("a.weight", "t0", "t1"),
        Connection("b.weight", "t1", "t2"),
        Connection("fc.weight", "t2", None),
    ]
    guided = {"a.weight": torch.ones(6, 3, dtype=torch.bool), "b.weight": torch.ones(5, 6, dtype=torch.bool)}
    guided["fc.weight"] = torch.ones(4, 5, dtype=torch.bool)
    guided["a.weight"][1] = False  # t1 unit 1 gets no input
    guided["b.weight"][:, 4] = False  # t1 unit 4 feeds nothing
    guided["b.weight"][2] = False  # t2 unit 2 gets no input
    dead = emptied_units(layers, guided)
    assert set(dead) == {"t1", "t2"} and dead["t1"].tolist() == [F_, T, F_, F_, T, F_]
    assert dead["t2"].tolist() == [F_, F_, T, F_, F_]
    twin = structured_connections(model, layers, guided)
    params = dict(model.named_parameters())
    removed = {}
    for tap, producer, count in (("t1", "a", 2), ("t2", "b", 1)):
        weight = params[f"{producer}.weight"].detach()
        l1 = [float(weight[u].abs().sum()) for u in range(weight.shape[0])]
        removed[tap] = torch.zeros(len(l1), dtype=torch.bool)
        removed[tap][sorted(range(len(l1)), key=lambda u: (l1[u], u))[:count]] = True
    expected = {
        "a.weight": ~removed["t1"][:, None].expand(6, 3),
        "b.weight": ~removed["t2"][:, None] & ~removed["t1"][None, :],
        "fc.weight": ~removed["t2"][None, :].expand(4, 5),
    }
    for path, mask in expected.items():
        assert torch.equal(twin[path], mask), path
    assert twin["fc.weight"].sum() == 4 * 4  # the classifier loses only the removed unit's inputs
    full = full_masks(model, twin)
    assert {t: int(d.sum()) for t, d in emptied_units(layers, full).items()} == {"t1": 2, "t2": 1}
    nothing = structured_connections(model, layers, {p: torch.ones_like(k) for p, k in guided.items()})
    assert all(k.all() for k in nothing.values())


def test_finetune_budgets_make_one_cell_per_budget():
    plan = PrunePlan.parse({"methods": ["none", "andc", "magnitude"], "thresholds": [0.3], "finetune_budgets": [1, 5]})
    cells = plan.cells()
    assert list(cells) == [
        "none,epochs=1",
        "none,epochs=5",
        "andc,threshold=0.3,epochs=1",
        "andc,threshold=0.3,epochs=5",
        "magnitude,threshold=0.3,epochs=1",
        "magnitude,threshold=0.3,epochs=5",
    ]
    assert [c.finetune_epochs for c in cells.values()] == [1, 5] * 3
    assert plan.to_dict()["finetune_budgets"] == [1, 5]
    for bad, match in (([], "at least one"), ([1, 1], "duplicate"), ([-1], ">= 0")):
        with pytest.raises(InputError, match=match):
            PrunePlan.parse({"methods": ["none"], "finetune_budgets": bad})


def test_seeds_make_one_cell_per_seed():
    plan = PrunePlan.parse({"methods": ["andc", "random"], "finetune_budgets": [1], "seeds": [0, 2]})
    cells = plan.cells()
    assert list(cells) == [
        "andc,threshold=0.3,epochs=1,seed=0",
        "andc,threshold=0.3,epochs=1,seed=2",
        "random,threshold=0.3,epochs=1,seed=0",
        "random,threshold=0.3,epochs=1,seed=2",
    ]
    assert [c.seed for c in cells.values()] == [0, 2, 0, 2] and plan.to_dict()["seeds"] == [0, 2]
    assert list(PrunePlan.parse({"methods": ["none"], "seed": 3}).cells()) == ["none"]  # no seeds: one cell
    for bad, match in (([], "at least one"), ([1, 1], "duplicate"), ([-1], r"prune.seeds: must be in \[0")):
        with pytest.raises(InputError, match=match):
            PrunePlan.parse({"methods": ["none"], "seeds": bad})


# ---------------------------------------------------------------- enforcement


def _vgg_with_random_masks(level=0.7):
    torch.manual_seed(0)
    model = build_model(TINY_VGG)
    gen = torch.Generator().manual_seed(3)
    masks = {
        p: random_at_level(w.shape, level, gen)
        for p, w in model.named_parameters()
        if p.endswith("0.weight") or p == "classifier.weight"
    }
    return model, masks


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masks_hold_after_steps_and_save_load_rebuild(tmp_path, optimizer):
    model, masks = _vgg_with_random_masks()
    apply_masks(model, masks)
    params = list(model.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=1e-2)
    )
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for path, mask in masks.items():
        weight = model.get_parameter(path.replace("weight", "parametrizations.weight.original"))
        effective = dict(model.named_modules())[path.rsplit(".", 1)[0]].weight
        assert (effective[~mask] == 0).all() and weight[mask].abs().sum() > 0
    save_masks(tmp_path / "masks.pt", masks)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = load_masks(tmp_path / "masks.pt")
    assert all(torch.equal(loaded[p], masks[p]) for p in masks)
    rebuilt = rebuild_pruned(model.spec, torch.load(tmp_path / "model.pt", weights_only=True), loaded)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert set(model_masks(rebuilt)) == set(masks)


def test_bad_masks_and_settings_name_the_field():
    model, masks = _vgg_with_random_masks()
    bad = dict(masks, **{"features.0.0.weight": torch.ones(4, 3, 3, 2, dtype=torch.bool)})
    with pytest.raises(PruneError, match=r"^features\.0\.0\.weight: mask shape \[4, 3, 3, 2\] does not fit"):
        apply_masks(model, bad)
    assert not model_masks(model)  # nothing was applied
    with pytest.raises(PruneError, match="^features.99.weight: no such parameter"):
        apply_masks(model, {"features.99.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(PruneError, match=r"^level: must be in \[0, 1\], got 1.5"):
        random_at_level((3, 3), 1.5, torch.Generator())
    with pytest.raises(InputError, match=r"^prune.analysis.threshold: must be in \(0, 1\), got 1.0"):
        PruneConfig.parse({"analysis": {"threshold": 1.0}})
    with pytest.raises(InputError, match=r"^prune.level: must be in \[0, 1\], got -0.1"):
        PruneConfig.parse({"method": "random", "level": -0.1})
    with pytest.raises(InputError, match="^prune.level: only for method random"):
        PruneConfig.parse({"method": "afcc", "level": 0.5})
    with pytest.raises(InputError, match="^prune.thresold: unknown key"):
        PruneConfig.parse({"thresold": 0.3})
    with pytest.raises(InputError, match="^prune.finetune_epochs: must be int, got 1.5"):
        PruneConfig.parse({"finetune_epochs": 1.5})
    with pytest.raises(InputError, match="^prune.method: list the methods"):
        split_config({"epochs": 1, "prune": {"method": "afcc"}})
    with pytest.raises(InputError, match="^prune.levels: fixed dilutions are cells of method random"):
        PrunePlan.parse({"methods": ["afcc"], "levels": [0.5]})


def test_prune_plan_cells_take_thresholds_and_the_analysis_settings():
    plan = PrunePlan.parse(
        {"methods": ["none", "andc", "random"], "thresholds": [0.3, 0.5], "levels": [0.2], "finetune_epochs": 3}
    )
    analysis = AnalysisConfig(recipe="lbfgs", train_size=100)
    cells = plan.cells(analysis)
    assert list(cells) == [
        "none",
        "andc,threshold=0.3",
        "andc,threshold=0.5",
        "random,threshold=0.3",
        "random,threshold=0.5",
        "random,level=0.2",
    ]
    assert all(c.finetune_epochs == 3 and c.control_of == "andc" for c in cells.values())
    assert cells["andc,threshold=0.5"].analysis == analysis.replace(threshold=0.5)
    assert PrunePlan.parse({}).cells()["afcc,threshold=0.3"].analysis.train_size == 5000  # the job's default


# ---------------------------------------------------------------- the job, end to end


def test_label_sets_file_gives_each_taps_unit_sets(tmp_path):
    path = tmp_path / "label_sets.json"  # the analysis layout: tap -> unit kind -> labels per unit
    path.write_text(
        json.dumps(
            {
                "threshold": 0.3,
                "num_classes": 5,
                "taps": {"conv.0": {"filter": [[1, 2], []]}, "block.0.heads": {"node": [[4]], "head": [[3, 4]]}},
            }
        )
    )
    assert unit_label_sets(load_label_sets(path)) == {"conv.0": [{1, 2}, set()], "block.0.heads": [{4}]}
    path.write_text('{"taps": [1, 2')
    with pytest.raises(InputError, match="label_sets.json: not a label_sets.json file"):
        load_label_sets(path)


def job(**values) -> PruneConfig:
    """A fast prune job: 1 fine-tuning epoch, readouts of 4 epochs on 128 images."""
    return PruneConfig.parse({"finetune_epochs": 1, "analysis": {"readout_epochs": 4, "train_size": 128}, **values})


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("parents")
    out = {}
    for name, model in (
        ("vgg", {**TINY_VGG, "num_classes": 4, "image_size": 16}),
        ("vgg_fc", {**TINY_VGG, "num_classes": 4, "image_size": 16, "fc_hidden": [128, 96]}),
        ("cct", {**TINY_CCT, "num_classes": 4}),
    ):
        job = synthetic_job(model=model, epochs=2)
        if name.startswith("vgg"):
            job["recipe"] = {"name": "sgd_step", "lr": 0.05}
        run_job(prepare(job), root / name)
        out[name] = root / name
    return out


def _check_artifacts(out, summary):
    for name in (
        "masks.pt",
        "model.pt",
        "spec.json",
        "config.json",
        "summary.json",
        "probs_val.parquet",
        "probs_test.parquet",
    ):
        assert (out / name).is_file(), name
    spec = json.loads((out / "spec.json").read_text())
    model = rebuild_pruned(spec, torch.load(out / "model.pt", weights_only=True), load_masks(out / "masks.pt"))
    _, labels, probs, _ = read_probs(out / "probs_test.parquet")
    assert probs.shape[1] == 4 and np.isclose((probs.argmax(1) == labels).mean(), summary["test_acc"])
    for path, mask in load_masks(out / "masks.pt").items():  # the fine-tuned weights obey the mask
        assert (dict(model.named_modules())[path.rsplit(".", 1)[0]].weight[~mask] == 0).all()
    assert json.loads((out / "summary.json").read_text())["test_acc"] == summary["test_acc"]


def test_prune_job_vgg_afcc_and_random_control(parents, tmp_path):
    guided = run_prune_job(parents["vgg"], tmp_path / "afcc", job(method="afcc"))
    _check_artifacts(tmp_path / "afcc", guided)
    assert set(guided["layers"]) == {f"features.{k}.0.weight" for k in (1, 3, 4, 6, 7, 8, 10, 11, 12)} | {
        "classifier.weight"
    }
    assert 0 < guided["dilution_pruned_layers"] < 1 and guided["params_kept"] < guided["params_total"]
    assert set(guided["label_stats"]) == {f"conv.{i}" for i in range(10)}
    for key in ("acc_before", "acc_pruned", "acc_finetuned"):
        assert set(guided[key]) == {"val", "test"}
    assert len(guided["history"]) == 1
    control = run_prune_job(
        parents["vgg"],
        tmp_path / "random",
        job(method="random"),
        label_sets=load_label_sets(tmp_path / "afcc" / "label_sets.json"),
    )
    assert control["acc_before"] == guided["acc_before"]
    for param, layer in guided["layers"].items():
        assert control["layers"][param]["kept"] == layer["kept"]
    assert not torch.equal(
        load_masks(tmp_path / "random" / "masks.pt")["classifier.weight"],
        load_masks(tmp_path / "afcc" / "masks.pt")["classifier.weight"],
    )
    magnitude = run_prune_job(
        parents["vgg"],
        tmp_path / "magnitude",
        job(method="magnitude", finetune_epochs=0),
        label_sets=load_label_sets(tmp_path / "afcc" / "label_sets.json"),
    )
    for param, layer in guided["layers"].items():
        assert magnitude["layers"][param]["kept"] == layer["kept"]
    structured = run_prune_job(
        parents["vgg"],
        tmp_path / "structured",
        job(method="structured", finetune_epochs=0),
        label_sets=load_label_sets(tmp_path / "afcc" / "label_sets.json"),
    )
    assert structured["units_emptied"] == guided["units_emptied"]  # the same count, other units
    labels = run_prune_job(
        parents["vgg"], tmp_path / "labels", job(method="random_labels", random_labels_k=2, finetune_epochs=0)
    )
    fc = load_masks(tmp_path / "labels" / "masks.pt")["classifier.weight"]  # 2 labels per filter
    assert (fc.sum(0) == 2).all() and not labels["label_stats"]


def test_prune_job_nodal_on_fc_layers(parents, tmp_path):
    summary = run_prune_job(parents["vgg_fc"], tmp_path / "nodal", job(method="nodal"))
    _check_artifacts(tmp_path / "nodal", summary)
    assert set(summary["layers"]) == {"fc.1.linear.weight", "classifier.weight"}
    assert set(summary["label_stats"]) == {"fc.0", "fc.1"} and summary["label_stats"]["fc.0"]["units"] == 8
    assert 0 < summary["dilution_pruned_layers"] < 1
    control = run_prune_job(
        parents["vgg_fc"],
        tmp_path / "random",
        job(method="random", control_of="nodal"),
        label_sets=load_label_sets(tmp_path / "nodal" / "label_sets.json"),
    )
    assert {p: l["kept"] for p, l in control["layers"].items()} == {p: l["kept"] for p, l in summary["layers"].items()}
    with pytest.raises(InputError, match="prune.control_of"):
        PruneConfig.parse({"method": "random", "control_of": "magnitude"})


def test_prune_job_cct_andc_and_cli(parents, tmp_path, capsys):
    summary = run_prune_job(parents["cct"], tmp_path / "andc", job(method="andc"))
    _check_artifacts(tmp_path / "andc", summary)
    assert set(summary["layers"]) == {f"blocks.{i}.mlp.fc{k}.weight" for i in (0, 1) for k in (1, 2)}
    assert summary["label_stats"]["block.1.ff_in"]["units"] == 32
    rc = prune_main(
        [
            "--parent",
            str(parents["cct"]),
            "--method",
            "random",
            "--level",
            "0.6",
            "--finetune-epochs",
            "0",
            "--out",
            str(tmp_path / "level"),
        ]
    )
    assert rc == 0 and "random: dilution=0.600" in capsys.readouterr().out
    level = json.loads((tmp_path / "level" / "summary.json").read_text())
    assert level["acc_finetuned"] == level["acc_pruned"] and not level["label_stats"]
    assert prune_main(["--parent", str(parents["cct"]), "--method", "afcc", "--out", str(tmp_path / "x")]) == 2
    assert "method: 'afcc' does not apply to a cct model" in capsys.readouterr().err
    assert prune_main(["--parent", str(parents["cct"]), "--threshold", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--threshold: must be in (0, 1), got 2.0" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["afcc_vgg11", "andc_cct"])
def test_shipped_prune_job_files_are_valid(name):
    from conftest import REPO

    from trainables.config import load_yaml

    train, plan = split_config(load_yaml(REPO / "configs" / "jobs" / f"{name}.yaml"))
    assert prepare(train).epochs >= 1
    cells = plan.cells()
    assert all(c.threshold == 0.3 and c.analysis.train_size == 2000 for c in cells.values())


def test_finetuning_warms_up_as_configured(parents, tmp_path):
    summary = run_prune_job(
        parents["cct"],
        tmp_path / "warm",
        job(method="none", finetune_epochs=2, finetune_warmup_epochs=1, finetune_lr=0.01),
    )
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs[0] == pytest.approx(0.01)  # the end of the warm-up epoch reaches the peak, then cosine decay
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["recipe"]["warmup_epochs"] == 1
    assert (
        prune_main(
            [
                "--parent",
                str(parents["cct"]),
                "--method",
                "none",
                "--finetune-warmup-epochs",
                "-1",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
