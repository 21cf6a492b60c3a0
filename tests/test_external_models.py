"""Models from outside the project (trainables/models/external.py): a factory from a user's own package
(tests/own_models) and torchvision builders, with taps and prunable connections named by module path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_args
from mlflow import MlflowClient
from torch import nn

from trainables.models import SpecError, build_model
from trainables.models.external import attention_heads

OWN = {"factory": "own_models.nets:conv_attention_net", "width": 8, "heads": 2, "num_classes": 4, "image_size": 16}
SMALL_VIT = {
    "factory": "torchvision.models:VisionTransformer",
    "patch_size": 4,
    "num_layers": 2,
    "num_heads": 4,
    "hidden_dim": 32,
    "mlp_dim": 64,
    "num_classes": 4,
    "image_size": 16,
}


def _captured(module: nn.Module, run) -> torch.Tensor:
    """The module's own output (first item of a tuple) during ``run()``."""
    seen = []
    handle = module.register_forward_hook(
        lambda m, a, k, out: seen.append(out[0] if isinstance(out, tuple) else out), with_kwargs=True
    )
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("separate_kv", [False, True])
def test_multihead_attention_heads_recombine_to_the_module_output(batch_first, separate_kv):
    torch.manual_seed(0)
    kv_dim = 12 if separate_kv else None
    mha = nn.MultiheadAttention(16, 4, kdim=kv_dim, vdim=kv_dim, batch_first=batch_first).eval()
    q = torch.randn(3, 5, 16)
    kv = torch.randn(3, 7, kv_dim or 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 5:] = True
    mask = torch.triu(torch.ones(5, 7, dtype=torch.bool), diagonal=3)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    call = {"key_padding_mask": padding, "attn_mask": mask, "need_weights": False}
    out, _ = mha(q, kv, kv, **call)
    heads = attention_heads(mha, (q, kv, kv), call, None)
    assert heads.shape == (3, 5, 16)  # batch first, heads * head_dim
    recombined = mha.out_proj(heads)
    expected = out if batch_first else out.transpose(0, 1)
    torch.testing.assert_close(recombined, expected, atol=1e-5, rtol=0)


def test_a_torchvision_vit_reads_its_heads_exactly():
    torch.manual_seed(0)
    model = build_model(SMALL_VIT).eval()
    layer = model.net.encoder.layers.encoder_layer_1
    tap = "encoder.layers.encoder_layer_1.self_attention"
    assert model.taps[tap].heads == 4 and model.taps[tap].head_dim == 8 and model.taps[tap].kind == "token"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        own = _captured(layer.self_attention, lambda: model(x))
        _, taps = model(x, taps=[tap])
        torch.testing.assert_close(layer.self_attention.out_proj(taps[tap]), own, atol=1e-5, rtol=0)
    assert list(model.prunable) == ["andc"] and len(model.prunable["andc"]) == 4  # two MLP layers per block


def test_torchvision_resnet18_ships_filter_taps_and_connections():
    model = build_model({"torchvision": "resnet18", "num_classes": 4, "image_size": 16})
    assert model.net.fc.out_features == 4  # num_classes from the data
    assert [t for t in model.taps if "." not in t or t.count(".") == 1][:3] == ["bn1", "layer1.0", "layer1.1"]
    layers = model.prunable["afcc"]
    assert len(layers) == 8 and {model.taps[t].kind for t in model.taps} == {"conv"}
    params = dict(model.named_parameters())
    _, taps = model(torch.randn(2, 3, 16, 16), taps=list(model.taps))
    for c in layers:  # a conv weight (out, in, k, k) joins its input tap's filters to its output tap's
        out_units, in_units = params[c.param].shape[:2]
        assert (taps[c.inputs].shape[1], taps[c.outputs].shape[1]) == (in_units, out_units)
    order = list(model.taps)
    assert order.index("layer1.0.bn2") < order.index("layer1.0")  # depth order: a block after its parts


def test_named_taps_of_an_own_model_and_a_fc_output_as_1x1_filters():
    model = build_model({**OWN, "taps": ["stem", "hidden", "attention", "head"]})
    kinds = {t: (i.kind, i.heads) for t, i in model.taps.items()}
    assert kinds == {
        "stem": ("conv", None),
        "hidden": ("conv", None),
        "attention": ("token", 2),
        "head": ("conv", None),
    }
    _, taps = model(torch.randn(3, 3, 16, 16), taps=["head"])
    assert taps["head"].shape == (3, 4, 1, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"torchvision": "resnet81"}, "model.torchvision: unknown model 'resnet81' (nearest: resnet18"),
        ({"factory": "own_models.nowhere:net"}, "model.factory: cannot import 'own_models.nowhere'"),
        ({"factory": "own_models.nets"}, "model.factory: expected 'package.module:function'"),
        ({"factory": "own_models.nets:missing"}, "model.factory: 'own_models.nets' has no callable 'missing'"),
        ({**OWN, "depth": 3}, "model.depth: not an argument of own_models.nets:conv_attention_net"),
        ({**OWN, "taps": ["stem", "hiden"]}, "model.taps: no module 'hiden' (nearest: hidden"),
        ({**OWN, "taps": "stem"}, "model.taps: expected a list of module paths"),
        (
            {**OWN, "connections": [{"param": "hidden.0.weights", "inputs": "stem", "outputs": "hidden"}]},
            "model.connections[0].param: no parameter 'hidden.0.weights' (nearest: hidden.0.weight",
        ),
        ({**OWN, "connections": [{"param": "hidden.0.weight"}]}, "model.connections[0]: expected {param, inputs"),
        ({**OWN, "image_size": 0}, "model.image_size: must be a positive integer"),
        ({"factory": "torch.nn:Identity", "num_classes": 4, "image_size": 16}, "model.num_classes: the model gives"),
        ({"factory": "torch:zeros", "num_classes": 4, "image_size": 16}, "model.factory: building failed"),
        ({**OWN, "torchvision": "resnet18"}, "model.factory: give exactly one of"),
        ({"torchvision": "vit_b_16", "num_classes": 4, "image_size": 30}, "model.torchvision: building failed"),
    ],
)
def test_a_bad_outside_model_is_one_line_naming_the_field(spec, message):
    with pytest.raises(SpecError) as err:
        build_model({"num_classes": 4, "image_size": 16, **spec})
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- through the public config surface


@pytest.fixture(scope="module")
def own_sweeps(tmp_path_factory):
    """Two finished sweeps through Ray Tune and MLflow, specs only: the own model over its ``width``
    argument (analysed by named taps, pruned by its declared connection) and torchvision's ResNet-18
    over ``zero_init_residual`` (shipped taps and connections)."""
    import ray
    from conftest import sweep_spec, write

    from orchestrator.cli import main

    tmp = tmp_path_factory.mktemp("own")
    own = sweep_spec(
        "own",
        base={
            **sweep_spec("x")["base"],
            "model": {
                "factory": "own_models.nets:conv_attention_net",
                "heads": 2,
                "taps": ["stem", "hidden", "attention", "norm"],
                "connections": [{"param": "hidden.0.weight", "inputs": "stem", "outputs": "hidden"}],
            },
        },
        axes={"width": [8, 16], "seed": [0]},
        analyze={"train_size": 128, "test_size": 64, "readout_epochs": 4},
        prune={"methods": ["afcc"], "finetune_epochs": 1},
    )
    resnet = sweep_spec(
        "tv",
        base={**sweep_spec("x")["base"], "model": {"torchvision": "resnet18"}, "epochs": 1},
        axes={"zero_init_residual": [False, True], "seed": [0]},
        analyze={"train_size": 128, "test_size": 64, "readout_epochs": 2, "taps": ["layer1.0", "layer4.1"]},
        prune={"methods": ["afcc", "random"], "finetune_epochs": 1},
    )
    with pytest.MonkeyPatch.context() as env:  # trial processes import the user's package, as on a cluster
        env.setenv("PYTHONPATH", f"{Path(__file__).parent}:{os.environ.get('PYTHONPATH', '')}")
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            for spec in (own, resnet):
                assert main(["sweep", str(write(tmp, spec)), *cli_args(tmp)]) == 0
        finally:
            ray.shutdown()
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return tmp, client


def _roles(client, name: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(name).experiment_id
    out: dict[str, list] = {}
    for run in client.search_runs([exp], max_results=1000):
        out.setdefault(run.data.tags["unitlab.role"], []).append(run)
    return out


def analysed_taps(client, trial, tmp: Path) -> dict:
    """A finished, analysed trial's ``analysis/taps.json`` taps."""
    assert trial.info.status == "FINISHED" and trial.data.tags["unitlab.analysis"] == "done"
    folder = Path(client.download_artifacts(trial.info.run_id, "analysis", str(tmp / trial.info.run_id)))
    return json.loads((folder / "taps.json").read_text())["taps"]


@pytest.mark.slow
def test_an_own_model_is_swept_analysed_pruned_and_joins_a_registered_committee(own_sweeps, capsys):
    from orchestrator.cli import main

    tmp, client = own_sweeps
    roles = _roles(client, "own")
    assert sorted(r.data.params["model.width"] for r in roles["trial"]) == ["16", "8"]
    for trial in roles["trial"]:
        taps = analysed_taps(client, trial, tmp)
        assert list(taps) == ["stem", "hidden", "attention", "norm"]
        assert set(taps["attention"]["kinds"]) == {"node", "head"}  # SNP and SHP of the attention's heads
        assert set(taps["stem"]["kinds"]) == {"filter"} and set(taps["norm"]["kinds"]) == {"node"}
    assert sorted(r.data.tags["unitlab.prune.cell"] for r in roles["prune"]) == ["afcc,threshold=0.3"] * 2
    for run in roles["prune"]:
        assert run.info.status == "FINISHED" and 0 < run.data.metrics["dilution/net.hidden.0.weight"] < 1
    uri = cli_args(tmp)[1]
    argv = [
        "committee",
        "--experiment",
        "own",
        "--method",
        "topk",
        "--size",
        "2",
        "--register",
        "own-committee",
        "--alias",
        "champion",
    ]
    assert main([*argv, "--tracking-uri", uri]) == 0
    import mlflow

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/own-committee@champion")
    answer = served.predict(np.zeros((3, 16, 16, 3), dtype=np.uint8))
    assert answer["probs"].shape == (3, 4) and np.allclose(answer["probs"].sum(1), 1, atol=1e-5)
    assert answer["label"].tolist() == answer["probs"].argmax(1).tolist()


@pytest.mark.slow
def test_torchvision_resnet18_variants_sweep_with_shipped_taps_and_connections(own_sweeps):
    tmp, client = own_sweeps
    roles = _roles(client, "tv")
    assert sorted(r.data.params["model.zero_init_residual"] for r in roles["trial"]) == ["False", "True"]
    for trial in roles["trial"]:
        taps = analysed_taps(client, trial, tmp)
        assert list(taps) == ["layer1.0", "layer4.1"] and set(taps["layer1.0"]["kinds"]) == {"filter"}
    cells = sorted(r.data.tags["unitlab.prune.cell"] for r in roles["prune"])
    assert cells == ["afcc,threshold=0.3"] * 2 + ["random,threshold=0.3"] * 2
    for run in roles["prune"]:
        dilutions = {k: v for k, v in run.data.metrics.items() if k.startswith("dilution/")}
        assert len(dilutions) == 8 and run.info.status == "FINISHED"  # one per basic block's conv2


def test_a_model_trained_elsewhere_is_analysed_from_its_factory_and_weights(tmp_path, capsys):
    import yaml

    from analysis.units.run import main as analysis_main

    net = build_model({**OWN, "taps": ["stem"]}).net  # stands for the user's trained module
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    data = tmp_path / "data.yaml"
    synthetic = {"name": "synthetic", "num_classes": 4, "image_size": 16, "train_size": 128, "val_size": 32}
    data.write_text(yaml.safe_dump({"data": {**synthetic, "test_size": 64}}))
    argv = ["--factory", OWN["factory"], "--model-args", '{"width": 8, "heads": 2}', "--weights"]
    argv += [str(tmp_path / "weights.pt"), "--data", str(data), "--taps", "stem,hidden,attention"]
    argv += ["--readout-epochs", "2", "--out", str(tmp_path / "out")]
    assert analysis_main(argv) == 0
    taps = json.loads((tmp_path / "out" / "taps.json").read_text())["taps"]
    assert list(taps) == ["stem", "hidden", "attention"] and set(taps["attention"]["kinds"]) == {"node", "head"}
    assert (tmp_path / "out" / "label_sets.json").is_file()
    capsys.readouterr()
    wrong = [a if a != '{"width": 8, "heads": 2}' else '{"width": 16}' for a in argv]
    assert analysis_main([*wrong[:-1], str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "weights.pt does not match own_models.nets:conv_attention_net" in err
    assert not (tmp_path / "out2").exists()


def test_a_small_torchvision_vit_gets_head_matrices_from_the_analysis(tmp_path):
    import yaml

    from analysis.units.run import main as analysis_main

    torch.manual_seed(0)
    net = build_model(SMALL_VIT).net
    torch.save(net.state_dict(), tmp_path / "vit.pt")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"name": "synthetic", "num_classes": 4, "image_size": 16, "train_size": 128}))
    args = {k: v for k, v in SMALL_VIT.items() if k not in ("factory", "num_classes", "image_size")}
    taps = "conv_proj,encoder.layers.encoder_layer_1.self_attention,encoder.ln"
    argv = ["--factory", SMALL_VIT["factory"], "--model-args", json.dumps(args), "--weights", str(tmp_path / "vit.pt")]
    argv += ["--data", str(data), "--taps", taps, "--readout-epochs", "2", "--out", str(tmp_path / "out")]
    assert analysis_main(argv) == 0
    found = json.loads((tmp_path / "out" / "taps.json").read_text())["taps"]
    heads = found["encoder.layers.encoder_layer_1.self_attention"]
    assert set(heads["kinds"]) == {"node", "head"} and heads["heads"] == 4 and heads["head_dim"] == 8
    assert set(found["conv_proj"]["kinds"]) == {"filter"} and set(found["encoder.ln"]["kinds"]) == {"node"}
