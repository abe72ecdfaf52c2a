"""The command-line face of `dejavu_jax.parallel`: the flags every command that runs the model on several devices
shares (`--tp`, and the multi-host coordinates), and what a `--json` report says about the placement."""

from __future__ import annotations

import argparse

from dejavu_jax.parallel import initialize_hosts, param_bytes_per_device, parse_tp, tp_size


def add_parallel_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """`several`: `--tp` takes a comma list (a benchmark times each); read it with `check_parallel_args`."""
    p.add_argument(
        "--tp",
        default="1",
        help="tensor parallelism: split heads and MLP neurons over this many devices (Megatron layout, one "
        "all-reduce after out_proj and one after fc2 per layer); 'auto' = every device JAX sees. Must divide "
        "the heads and the ffn width (default 1: one device)"
        + ("; a comma list times each in turn" if several else ""),
    )
    hosts = p.add_argument_group(
        "several hosts",
        "run the same command on every host with these (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
        "JAX_PROCESS_ID); --tp then counts every host's devices",
    )
    hosts.add_argument("--coordinator", default=None, help="HOST:PORT of process 0's coordinator service")
    hosts.add_argument("--num-processes", type=int, default=None, help="how many processes (hosts) take part")
    hosts.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. --num-processes - 1")


def check_parallel_args(args, several: bool = False):
    """The `--tp` value (`parallel.parse_tp`; with `several`, a list of them), after joining a multi-host run if
    one is asked for; a ValueError for a bad value. Call it before anything touches a device."""
    tp = [parse_tp(v) for v in str(args.tp).split(",")] if several else parse_tp(args.tp)
    initialize_hosts(args.coordinator, args.num_processes, args.process_id)
    return tp


def placement_report(params) -> dict:
    """What a `--json` output says about where the parameters live: "tp" and "param_bytes_per_device"."""
    return {"tp": tp_size(params), "param_bytes_per_device": param_bytes_per_device(params)}
