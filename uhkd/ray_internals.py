"""Every use of a private Ray API or of Ray's process internals, in one place.

Ray may change any of these in a minor release (pyproject.toml states the range tested; docs/ray-versions.md says
how to try a newer Ray). Each function names the public behaviour it stands in for and the Ray issue behind it,
and falls back when the installed Ray no longer has what it uses: the sweep stays correct, at the cost the
function states (what it would have freed is freed when the cluster stops, a cluster it would have found must be
named with --cluster ADDRESS, ...), and the first fallback of each function says so in one line on stderr.
`fallbacks()` lists those of this process; tests/test_ray_internals.py runs every function on the installed Ray
and fails naming the one whose internal is gone.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import ray

from .errors import one_line

T = TypeVar("T")
_fallbacks: dict[str, str] = {}


class Missing(LookupError):
    """The installed Ray lacks an internal (raised inside this module, turned into the function's fallback)."""


def fallbacks() -> dict[str, str]:
    """Function name -> what was missing, for each function of this module that fell back in this process."""
    return dict(_fallbacks)


def internal(fallback: Callable[..., T], cost: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Run the function; if Ray lacks what it uses (an import, an attribute, a signature, a process flag), say so
    once and return `fallback(*args)` instead."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> T:
            try:
                return fn(*args, **kwargs)
            except (ImportError, AttributeError, TypeError, Missing) as exc:
                if fn.__name__ not in _fallbacks:
                    _fallbacks[fn.__name__] = one_line(f"{type(exc).__name__}: {exc}")
                    print(f"warning: Ray {ray.__version__} lacks what uhkd.ray_internals.{fn.__name__} uses "
                          f"({_fallbacks[fn.__name__]}); {cost}", file=sys.stderr)
                return fallback(*args, **kwargs)

        return run

    return wrap


# --- finding clusters on this machine (`--cluster auto`) ------------------------------------------------------------

@internal(lambda: "", "--cluster auto does not find the cluster `ray start --head` recorded here; give --cluster "
                      "ADDRESS or RAY_ADDRESS")
def recorded_address() -> str:
    """The address `ray start --head` recorded in Ray's default temp folder on this machine ("" if none).

    Stands in for the first step of `ray.init(address="auto")` without its second, which attaches to any GCS
    process `ps` shows (another user's embedded cluster included; ray-project/ray#55244)."""
    from ray._private.utils import read_ray_address

    return read_ray_address() or ""


def _command_lines() -> Iterator[list[str]]:
    """The arguments of each process running on this machine."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            yield cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue


@internal(lambda: [], "--cluster auto does not find clusters started with `ray start --temp-dir`; give --cluster "
                      "ADDRESS")
def gcs_temp_dirs() -> list[Path]:
    """The temp folder of each Ray GCS server running on this machine, read from its `--log_dir=<temp
    dir>/session_*/logs` argument; `ray start --temp-dir` records the cluster's address in `<temp
    dir>/ray_current_cluster`.

    Stands in for `ray.init()` finding a cluster started with `ray start --temp-dir`, which it does not
    (ray-project/ray#55244; the fix, ray-project/ray#55597, is unmerged)."""
    found, servers = set(), 0
    for args in _command_lines():
        if not args[0].endswith("gcs_server"):
            continue
        servers += 1
        found.update(Path(a.removeprefix("--log_dir=")).parent.parent for a in args if a.startswith("--log_dir="))
    if servers and not found:
        raise Missing(f"{servers} gcs_server process(es) run here, none with a --log_dir= argument")
    return sorted(found)


@internal(lambda gcs_address: None, "an autoscaling cluster's node types (autoscaler v1, `ray up`) are unknown: "
                                    "trials at once are counted on the nodes up now")
def autoscaler_config_file(gcs_address: str) -> str | None:
    """The cluster config file autoscaler v1 (what `ray up` runs) reads, from the `--autoscaling-config=`
    argument of the cluster's monitor process on this (head) node; None when its monitor has none (a fixed
    cluster) or no monitor of the cluster runs here.

    Stands in for the cluster config in the GCS (`cluster_node_groups`), which only autoscaler v2 and KubeRay
    publish (ray-project/ray#63012 would have v1 publish it too; closed unmerged)."""
    for args in _command_lines():
        if any(a.endswith("monitor.py") for a in args) and f"--gcs-address={gcs_address}" in args:
            return next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
    return None


@internal(lambda: [], "an autoscaling cluster's node types (autoscaler v2, KubeRay) are unknown: trials at once "
                      "are counted on the nodes up now")
def cluster_node_groups() -> list[tuple[dict[str, float], int]]:
    """(resources, max count; -1 = unlimited) of each node group autoscaler v2 or KubeRay publishes in the GCS,
    [] on a fixed cluster.

    Stands in for a public cluster-config API, which Ray lacks (Ray Data's own autoscaler reads the same private
    call, ray-project/ray#59682)."""
    from ray._private.state import state

    config = state.get_cluster_config()
    return [(dict(g.resources), g.max_count) for g in (config.node_group_configs if config else ())]


# --- this driver's Ray ----------------------------------------------------------------------------------------------

TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


@internal(lambda: None, "Ray's own console warning that token authentication is on may appear")
def quiet_token_notice() -> None:
    """Silence Ray's console warning that an embedded cluster has token authentication on (the toolkit says so in
    its own line). Stands in for an option to turn that notice off, which Ray (2.59+) lacks; no Ray issue filed."""
    if importlib.util.find_spec(TOKEN_NOTICE_LOGGER) is None:
        raise Missing(f"no module {TOKEN_NOTICE_LOGGER}")
    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)


@internal(lambda: "", "--cluster ray://ADDRESS reconnects even when this process is already connected there")
def client_address() -> str:
    """The `ray://host:port` this process's Ray Client connection was made to. Stands in for a public accessor
    of the Ray Client address, which Ray lacks (`ray.get_runtime_context().gcs_address` is the cluster's GCS); no
    Ray issue filed."""
    return "ray://" + ray.util.client.ray.get_context().client_worker._conn_str  # noqa: SLF001


# --- interruptions: the embedded cluster out of the driver's process group, a moved sweep's trials ------------------

NO_SESSION = contextlib.nullcontext()  # own_session's fallback: Ray's processes stay in the driver's group


@internal(lambda: NO_SESSION, "a signal to the driver's whole process group (Slurm's scancel, `timeout`, Kubernetes) "
                              "also kills the embedded cluster: the sweep then ends after 10 s, its tables compacted, "
                              "instead of stopping cleanly")
def own_session() -> ContextManager[None]:
    """A context in which the Ray processes `ray.init` starts (an embedded cluster's GCS server, raylet and helpers,
    and through the raylet every worker) start in a session of their own, so that a signal to the driver's process
    group reaches the driver alone; they still end with the driver (Ray has the kernel kill them when their parent
    dies). Stands in for a `ray.init` option to start them so, which Ray lacks; no Ray issue filed."""
    from ray._private import services

    spawn = services.ConsolePopen  # what Ray starts its processes with

    class OwnSession(spawn):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "start_new_session": True})

    @contextlib.contextmanager
    def spawning_in_own_session() -> Iterator[None]:
        services.ConsolePopen = OwnSession
        try:
            yield
        finally:
            services.ConsolePopen = spawn

    return spawning_in_own_session()


@internal(lambda trial, path, filesystem: None, "the trials a moved sweep's restored search creates keep their "
                                                "checkpoints at the sweep's old place")
def move_trial_storage(trial: Any, path: str, filesystem: Any) -> None:
    """Point a Tune trial's storage (where Tune keeps its checkpoints and logs) at the experiment storage `path` on
    `filesystem`, as Tune does for the trials it restores from a moved experiment. Stands in for Tune moving the
    trials a restored search creates, whose saved experiment spec keeps the old storage; no Ray issue filed."""
    storage = copy.copy(trial.storage)
    storage.storage_filesystem = filesystem
    storage.storage_fs_path = path
    trial.set_storage(storage)  # also moves the trial's tracked checkpoints


# --- what Ray Train leaves behind when Tune stops a trial -----------------------------------------------------------
# Ray Train's own cleaner of a stopped run (a detached PlacementGroupCleaner actor per fit()) asks the dashboard's State
# API whether the run's controller lives (ray-project/ray#58515): without a dashboard it never learns, so the run's
# worker placement group stays reserved and the cleaner stays alive (ray-project/ray#61689 fixed one such case).
# The GCS tables below say enough without the State API.

@dataclass(frozen=True)
class Actor:
    """A live actor as the GCS records it."""

    class_name: str
    job_id: bytes
    worker_id: bytes  # of the actor's own worker
    owner_worker_id: bytes  # of the worker that created it
    node_id: str  # hex
    pid: int


@internal(lambda: [], "Ray Train's detached cleaners of stopped trials (~110 MB each) stay until the cluster stops")
def live_actors() -> list[Actor]:
    """Every live actor of the cluster, with the pid and owner the public `ray.util.state.list_actors` reports only
    through the dashboard (ray-project/ray#58515, #61689 above)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    actors = [gcs_pb2.ActorTableData.FromString(raw) for raw in
              state._connect_and_get_accessor().get_actor_table(None, "ALIVE")]  # noqa: SLF001
    return [Actor(a.class_name, a.job_id, a.address.worker_id, a.owner_address.worker_id, a.address.node_id.hex(),
                  a.pid) for a in actors]


@internal(lambda job_id: [], "worker placement groups of Ray Train trials Tune stopped are released only by Ray "
                             "Train's own cleaner (with the dashboard) or when the cluster stops; until then later "
                             "trials may wait for their resources")
def placement_groups_of_dead_creators(job_id: bytes) -> list[ray.util.placement_group.PlacementGroup]:
    """The placement groups of job `job_id` (not detached, not removed) whose creating actor has died. Stands in
    for the creator fields `ray.util.placement_group_table()` leaves out (ray-project/ray#58515, #61689 above)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    found = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():  # noqa: SLF001
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached and pg.creator_actor_dead
                and not ray.ActorID(pg.creator_actor_id).is_nil() and pg.creator_job_id == job_id):
            found.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return found


@internal(lambda: set(), "the detached cleaners of sweep drivers killed earlier on this cluster stay until it stops")
def ended_jobs() -> set[bytes]:
    """The ids of the cluster's jobs that have ended. Stands in for the public job API, `ray.job_submission`, which
    needs the dashboard and lists only submitted jobs (the cleaners of a killed driver's stopped trials outlive it:
    ray-project/ray#61689 above)."""
    from ray._private.state import state

    return {bytes.fromhex(job["JobID"]) for job in state.job_table() if job["IsDead"]}


@internal(lambda job_id: True, "Ray's AutoscalingCoordinator actor (~110 MB) stays until the cluster stops")
def other_jobs_running(job_id: str) -> bool:
    """Whether a job other than `job_id` (hex) runs on the cluster (see `ended_jobs`)."""
    from ray._private.state import state

    return any(not job["IsDead"] and job["JobID"] != job_id for job in state.job_table())


# --- experiment tracking: Ray's W&B and MLflow callbacks ------------------------------------------------------------

@internal(lambda callback: None, "offline W&B runs may miss their last files (Ray ends its logging actor while "
                                 "wandb still writes them)")
def wait_for_wandb_files(callback: Any) -> None:
    """Make `callback` (Ray's W&B logger callback) log each trial from an actor that waits for wandb's service to
    write the run's files before it returns (Ray kills its logging actor as soon as `run` returns). Stands in for a
    teardown hook in Ray's public `WandbLoggerCallback`, which it lacks; no Ray issue filed."""
    from ray.air.integrations.wandb import _WandbLoggingActor

    class WandbRunActor(_WandbLoggingActor):
        def run(self) -> None:
            super().run()
            self._wandb.teardown()

    callback._logger_actor_cls = WandbRunActor  # noqa: SLF001


@internal(lambda callback, trial, exclude, **init: False, "W&B runs get Tune's nested trial config instead of the "
                                                          "flat dotted keys")
def start_wandb_run(callback: Any, trial: Any, exclude: list[str], **init: Any) -> bool:
    """Start `callback`'s W&B logging actor for `trial` with our own `wandb.init` arguments (the flat config),
    leaving out `exclude` and the results Ray always leaves out. False: the caller falls back to Ray's own
    `log_trial_start`. Stands in for a config hook in Ray's public `WandbLoggerCallback`, which it lacks; no Ray
    issue filed."""
    callback._start_logging_actor(trial, [*callback._exclude_results, *exclude], **init)  # noqa: SLF001
    return True


@internal(lambda callback: None, "MLflow runs get Tune's nested trial config and every result instead of the flat "
                                 "dotted keys and one step per epoch")
def mlflow_runs(callback: Any) -> dict[Any, str] | None:
    """Ray's MLflow callback's trial -> run id map (its own `log_trial_end` reads it); None: the caller falls back
    to Ray's own logging. Stands in for a params hook in Ray's public `MLflowLoggerCallback`, which it lacks; no
    Ray issue filed."""
    return callback._trial_runs  # noqa: SLF001
