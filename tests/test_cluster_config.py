"""cluster.yaml is a valid `ray up` config by Ray's own schema and defaults."""

from __future__ import annotations

import copy
import json
import os

import jsonschema
import yaml
from conftest import REPO


def load_cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_cluster()
    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    jsonschema.validate(config, json.loads(open(schema_path).read()))
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_runs_mlflow_on_the_head_and_scales_gpu_workers_from_zero():
    config = load_cluster()
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_cmds and "--serve-artifacts" in head_cmds
    # the tracking store and the studies on the head's PostgreSQL, the password never in a URI
    assert "--backend-store-uri postgresql+psycopg://mlflow@" in head_cmds and "/optuna;" in head_cmds
    assert "install -y -qq postgresql" in " ".join(config["head_setup_commands"]) and ".pgpass" in " ".join(
        config["head_setup_commands"]
    )
    assert "service postgresql restart" in head_cmds and "createdb -O mlflow" in head_cmds
    assert "MLFLOW_TRACKING_URI" in head_cmds
    worker = config["available_node_types"]["gpu_worker"]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert "py311" in config["docker"]["image"] and "2.60.0" in config["docker"]["image"]
    assert any("pip install" in cmd and "unitlab" in cmd for cmd in config["setup_commands"])


def test_cluster_listens_on_no_public_address():
    config = load_cluster()
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in head_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "mlflow server --host $(hostname -I" in head_cmds  # the private IP, for the workers
    assert "listen_addresses = 'localhost,$(hostname -I" in head_cmds and "samenet" in head_cmds
