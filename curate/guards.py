"""Guards that refuse a run before any work, from what the cluster is: local paths that other nodes
cannot see, weights missing where the model actors run."""
from __future__ import annotations

from curate.config import Config, ConfigError
from curate.run.runtime import alive_nodes, on_every_node
from curate.run.storage import is_local
from filters.models import ModelOptions


def check_paths_reach_every_node(cfg: Config) -> None:
    """Before any work: refuse local paths that tasks on other nodes would look for on their own disks."""
    refusal = local_paths_refusal(cfg, len(alive_nodes()))
    if refusal:
        raise ConfigError(refusal)


def local_paths_refusal(cfg: Config, nodes: int) -> str | None:
    """Why a run cannot use its local paths on a cluster of `nodes` live nodes, or None.

    One node (a laptop, one machine) reads local paths fine; on several, run_dir and the inputs must
    be on object storage, or on a filesystem every node mounts at the same path, which the config
    declares with storage.shared_mount."""
    local = ([f"run_dir {cfg.run_dir}"] if is_local(cfg.run_dir) else []) + \
        [f"input path {p}" for p in cfg.input.paths if is_local(p)]
    if nodes < 2 or cfg.storage.shared_mount or not local:
        return None
    return (f"this Ray cluster has {nodes} nodes alive, but {' and '.join(local)} "
            f"{'is a local path' if len(local) == 1 else 'are local paths'}: tasks on the other nodes would read and "
            f"write their own disks. Put the run and its inputs on object storage (run_dir: s3://BUCKET/runs/NAME, "
            f"input.paths: [s3://BUCKET/urls/*.parquet]), or, if these paths are on a filesystem that every node "
            f"mounts at the same place (NFS, Lustre, CephFS), set storage.shared_mount: true")


def check_weights_where_actors_run(cfg: Config) -> None:
    """Before any shard is scored, every node that can host a model actor must hold the weights the
    driver found: a node without them would fail its shards one by one, after the work before them.

    The driver checked its own node; on one node nothing more is asked."""
    import ray

    nodes = alive_nodes()
    if not cfg.models.enabled or (len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()):
        return
    lacking = missing_weights_by_node(cfg.models)
    if lacking:
        lines = "\n".join(f"  - node {node}: {scorer}: {why}" for node, missing in sorted(lacking.items())
                          for scorer, why in missing.items())
        raise ConfigError(f"models: weights are missing where the model actors run (models.models_dir or "
                          f"$CURATE_MODELS_DIR on each node):\n{lines}\nput them on every node (or on storage they "
                          f"all mount), or drop those scorers from models.enabled")


def missing_weights_by_node(opts: ModelOptions) -> dict[str, dict[str, str]]:
    """{node address: {scorer: why}} for each live node that could host a model actor and lacks weights
    of an enabled scorer, as that node itself sees its disk and environment."""
    from filters.models import skipped_when_offline

    on_gpus = opts.num_gpus > 0 and "ocr" not in opts.enabled   # OCR actors may run on CPU nodes
    found = on_every_node(skipped_when_offline, opts, needs={"GPU": opts.num_gpus} if on_gpus else None)
    return {node: why for node, why in found.items() if why}
