"""Submit a training run as a Lightning.ai job (studio-backed), resumable after preemption.

    pip install lightning-sdk && lightning login
    python scripts/lightning_job.py --name therapeutic-h100 --studio my-studio --machine H100 \
        --interruptible --attempts 5 -- +recipe=therapeutic_h100
    python scripts/lightning_job.py ... --dry-run -- +recipe=therapeutic_h100     # print, submit nothing

Why each piece:
- the run directory is fixed (default: $LIGHTNING_ARTIFACTS_DIR/<name>, expanded on the job machine), so
  a restarted attempt finds <run_dir>/checkpoints and train.py resumes from it;
- train.py exits 143 on SIGTERM (the platform's notice before reclaiming an interruptible machine), which
  marks the attempt failed, so the platform starts another attempt, up to --attempts;
- WANDB_API_KEY / HF_TOKEN are forwarded from your environment when set (never written to the command).
- --num-machines N > 1 submits a multi-machine job with trainer.num_nodes=N and DDP; Lightning reads the
  rendezvous variables the platform sets.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "HF_TOKEN")


def build_command(overrides: list[str], run_dir: str, num_machines: int = 1, devices: str | None = None) -> str:
    args = list(overrides)
    if num_machines > 1:
        args += [f"trainer.num_nodes={num_machines}", "trainer.strategy=ddp"]
    if devices:
        args.append(f"trainer.devices={devices}")
    args.append(f"hydra.run.dir={run_dir}")
    # run_dir may hold $LIGHTNING_ARTIFACTS_DIR: leave it to the job's shell, quote everything else
    return "python train.py " + " ".join(a if a.startswith("hydra.run.dir=") else shlex.quote(a) for a in args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="job name (unique in the teamspace)")
    parser.add_argument("--studio", help="studio whose environment and files the job runs in")
    parser.add_argument("--teamspace", help="owner/teamspace (default: the studio's)")
    parser.add_argument("--machine", default="H100", help="lightning_sdk Machine name, e.g. H100, H200, A100_X_8")
    parser.add_argument("--interruptible", action="store_true", help="spot pricing; preemption is resumed from")
    parser.add_argument("--attempts", type=int, default=3, help="max_run_attempts: restarts after preemption")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--devices", help="GPUs per machine for trainer.devices (default: the recipe's)")
    parser.add_argument("--run-dir", help="fixed run directory (default: $LIGHTNING_ARTIFACTS_DIR/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the job, submit nothing")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, after --")
    args = parser.parse_args(argv)

    run_dir = args.run_dir or f"$LIGHTNING_ARTIFACTS_DIR/{args.name}"
    command = build_command(args.overrides, run_dir, args.num_machines, args.devices)
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    print(f"job {args.name!r} on {args.num_machines} x {args.machine} (interruptible={args.interruptible}, "
          f"attempts={args.attempts})\n  {command}\n  env: {sorted(env) or 'none forwarded'}")
    if args.dry_run:
        return 0

    try:
        from lightning_sdk import MMT, Job, Machine
    except ImportError:
        print("lightning-sdk is not installed: pip install lightning-sdk && lightning login", file=sys.stderr)
        return 2
    common = dict(
        name=args.name, machine=getattr(Machine, args.machine), command=command, studio=args.studio,
        teamspace=args.teamspace, env=env, interruptible=args.interruptible, max_run_attempts=args.attempts,
    )
    job = MMT.run(num_machines=args.num_machines, **common) if args.num_machines > 1 else Job.run(**common)
    print(f"submitted: {getattr(job, 'link', job)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
