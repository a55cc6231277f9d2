"""What a sweep job asks its scheduler for, read from the job's own trainer config: `trainer.devices` per node
and `trainer.num_nodes` (the `${ssd.job_*}` resolvers of conf/hydra/launcher/*.yaml)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# What Lightning runs on a GPU; `auto` on a cluster means the GPUs the job was given.
_GPU_ACCELERATORS = ("auto", "gpu", "cuda")


def devices_per_node(devices: Any) -> int:
    """Processes per node that `trainer.devices` asks for: `auto` is one, a count or a list of indices as
    given. `-1` (every device of the machine) has no size a scheduler can reserve."""
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    text = str(devices).strip()
    if "," in text:  # "0,1": device indices
        return len([part for part in text.split(",") if part.strip()])
    if text == "auto":
        return 1
    if text.lstrip("-").isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(
        f"trainer.devices={devices} does not say how many devices to reserve for a sweep job: "
        "give a number (trainer.devices=4)"
    )


def job_tasks_per_node(devices: Any) -> int:
    """One task per device: Lightning's SLURM environment sets up DDP from the tasks SLURM starts."""
    return devices_per_node(devices)


def job_gpus_per_node(devices: Any, accelerator: Any) -> int | None:
    """GPUs to reserve per node; None for a CPU job (`trainer.accelerator=cpu`)."""
    if str(accelerator).lower() not in _GPU_ACCELERATORS:
        return None
    return devices_per_node(devices)


#: What a job asks for per task when `dataset.num_workers: auto` (its loader then takes all but one of them).
AUTO_CPUS_PER_TASK = 5


def job_cpus_per_task(num_workers: Any) -> int:
    """The training process and its data loader workers."""
    return AUTO_CPUS_PER_TASK if num_workers == "auto" else int(num_workers or 0) + 1


@dataclass(frozen=True)
class JobResources:
    """What one job needs; jobs that need the same are submitted together."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int | None
    cpus_per_task: int | None

    @classmethod
    def of(cls, launcher: Any) -> JobResources:
        """From a job's resolved `hydra.launcher` config."""
        gpus, cpus = launcher.get("gpus_per_node"), launcher.get("cpus_per_task")
        return cls(
            nodes=int(launcher.get("nodes") or 1),
            tasks_per_node=int(launcher.get("tasks_per_node") or 1),
            gpus_per_node=int(gpus) if gpus else None,
            cpus_per_task=int(cpus) if cpus else None,
        )

    def parameters(self) -> dict[str, Any]:
        """As submitit's executor parameters."""
        return {
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
            "gpus_per_node": self.gpus_per_node,
            "cpus_per_task": self.cpus_per_task,
        }
