"""Hydra composition of the real config tree, the recipe's values, and validation before any weights load."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from conftest import REPO, clean_env, compose, run_guarded, train_cmd
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_moe.config import ConfigError, validate_config
from lightning_moe.config.registry import EXPERTS, ROUTER_CONFIGS
from lightning_moe.config.routers import MOVED, migrate_saved
from lightning_moe.models.layout import resolve_moe_layers

RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))


def test_recipe_group_is_not_in_primary_defaults():
    defaults = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["defaults"]
    assert not any(isinstance(d, dict) and "recipe" in d for d in defaults)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_with_plus_and_validates(recipe):
    cfg = compose([f"+recipe={recipe}"])
    validate_config(cfg)
    first_line = (REPO / "conf" / "recipe" / f"{recipe}.yaml").read_text().splitlines()[0]
    assert first_line == "# @package _global_"
    assert "python train.py +recipe=" + recipe in (REPO / "conf" / "recipe" / f"{recipe}.yaml").read_text()


def test_therapeutic_h100_has_every_value_of_the_design():
    cfg = compose(["+recipe=therapeutic_h100"])
    s = validate_config(cfg)
    assert s.model.name_or_path == "LatitudeGames/Wayfarer-2-12B" and s.model.dtype == "bfloat16"
    assert (s.lora.r, s.lora.alpha) == (16, 32)
    assert s.domains == ["psychology", "mental_health", "bias_detection", "general_therapeutic"]
    assert (s.moe.num_experts, s.moe.top_k, s.moe.router) == (4, 2, "topk")
    assert resolve_moe_layers(s.moe, 40) == [5, 15, 25, 35]  # 4 layers spread over the 40-layer depth
    assert cfg.trainer.precision == "bf16-mixed" and s.optim.fused is True and s.model.gradient_checkpointing
    assert (s.data.batch_size, cfg.trainer.accumulate_grad_batches) == (4, 8)
    assert s.data.batch_tokens == 4 * 2048  # the design's micro-batch of 4 x 2048, restated in tokens
    # measured (scripts/benchmark.py): 4 checkpointed layers of 40, LoRA dropout 0 (no dropped-out input copies)
    assert s.model.liger_kernel and s.model.gradient_checkpointing_layers == 4 and s.lora.dropout == 0
    assert s.model.attn_implementation == "varlen" and s.data.packing  # packed rows as FlashAttention spans
    qlora = validate_config(compose(["+recipe=therapeutic_qlora"]))
    assert qlora.model.load_in_4bit and qlora.model.gradient_checkpointing_layers is None
    assert not qlora.model.upcast_non_quantized and qlora.optim.name == "adamw_8bit"
    small = compose(["+recipe=therapeutic_qlora_24gb"])  # the measured 24 GB setting, the same tokens a step
    assert small.model.load_in_4bit and small.model.gradient_checkpointing_layers == 20
    assert small.data.batch_tokens * small.trainer.accumulate_grad_batches == 8 * 8192
    # the measured faster variants drop checkpointing and keep the effective batch of 32
    fast, h200 = compose(["+recipe=therapeutic_h100_fast"]), compose(["+recipe=therapeutic_h200"])
    assert (fast.data.batch_size, fast.trainer.accumulate_grad_batches) == (4, 8)
    assert (h200.data.batch_size, h200.trainer.accumulate_grad_batches) == (8, 4)
    assert not fast.model.gradient_checkpointing and not h200.model.gradient_checkpointing
    assert (s.data.num_workers, s.data.pin_memory) == (4, True)
    assert (s.optim.lr, s.optim.scheduler, s.optim.warmup_steps, s.optim.weight_decay) == (3e-4, "cosine", 1000, 0.01)
    assert cfg.trainer.gradient_clip_val == 1.0
    assert s.data.max_length == 2048
    assert cfg.trainer.max_time == "00:12:00:00"
    ckpt = instantiate(cfg.callbacks.model_checkpoint)
    assert ckpt._train_time_interval == timedelta(minutes=30) and ckpt.save_last
    assert cfg.callbacks.early_stopping.patience == 3 and cfg.callbacks.early_stopping.monitor == "val/loss"
    assert "wandb" in cfg.logger and cfg.logger.wandb._target_ == "lightning_moe.reporting.loggers.wandb_logger"
    assert s.data.val_fraction == 0.1 and not s.data.val_files


def test_cfg_job_prints_the_recipe(tmp_path):
    out = subprocess.run(
        train_cmd("+recipe=therapeutic_h100", "--cfg", "job"), cwd=tmp_path, env=clean_env(),
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["name_or_path"] == "LatitudeGames/Wayfarer-2-12B"
    assert cfg["moe"]["layers"] == [5, 15, 25, 35] and cfg["trainer"]["max_time"] == "00:12:00:00"
    assert cfg["callbacks"]["model_checkpoint"]["train_time_interval"] == {"_target_": "datetime.timedelta", "minutes": 30}


@pytest.mark.parametrize(
    "override, key",
    [
        ("moe.top_k=5", "moe.top_k"),
        ("moe.num_experts=3", "domains"),  # domain supervision maps 4 domains to 4 experts
        ("trainer.max_time=12h", "trainer.max_time"),
        ("moe.router=sinkhorn", "moe.router"),
        ("moe.expert=giant", "moe.expert"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("+moe.topk=2", "moe.topk"),  # a typo is named, not ignored
        ("moe.top_k=two", "moe.top_k"),
        ("model.init=scratch", "model.init"),
        ("model.gradient_checkpointing_layers=2", "model.gradient_checkpointing_layers"),  # checkpointing is off
        ("model.gradient_checkpointing_layers=0", "model.gradient_checkpointing_layers"),
        ("optim.name=adam8", "optim.name"),
        ("model.compile=true", "model.compile"),  # a scope: none | layers | moe | all
    ],
)
def test_bad_values_are_named(override, key):
    """Type errors and unknown keys fail at composition (typed schema), cross-field rules in validate_config;
    either way the message names the key."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises((ConfigError, ConfigCompositionException)) as err:
        validate_config(compose([override]))
    text = str(err.value) + str(err.value.__cause__ or "")
    assert key in text, text


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_flat_router_key_of_an_old_command_line_is_refused_naming_its_new_key(old):
    with pytest.raises(ConfigError, match=re.escape(f"moe.{old} moved to moe.{MOVED[old][0]}")):
        validate_config(compose([f"moe.{old}=2"]))


@pytest.mark.parametrize("moe", ["deepseek", "dynamic_threshold", "expert_choice", "switch", "domain_topk", "upcycled"])
def test_a_run_saved_before_the_router_sections_loads_with_the_same_settings(moe):
    """A run's config.yaml from before the move has every router's and expert form's knobs flat in `moe`;
    migrate_saved (what loading a run applies) gives the same sections the conf group composes to now."""
    from dataclasses import asdict

    now = validate_config(compose([f"moe={moe}"]))
    saved = OmegaConf.create(OmegaConf.to_container(compose([f"moe={moe}"])))
    flat = {"capacity_factor": 1.25, "dynamic_mode": "top_p", "dynamic_p": 0.5, "dynamic_threshold": 0.25,
            "min_experts": 1, "max_experts": None, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
            "routed_scaling_factor": 1.0, "bias_update_rate": 0.0, "bias_update_center": True,
            "upcycle_train": "lora", "upcycle_noise": 0.0}  # the old defaults
    def own(section: str) -> dict:  # the chosen router's or form's section, as composed now
        return asdict(getattr(now.moe, section)) if hasattr(now.moe, section) else {}

    for old, new in MOVED.items():
        section, key = new[0].split(".")
        if old == "capacity_factor":  # one flat key for two routers: the chosen one's value
            section = now.moe.router
        saved.moe[old] = own(section).get(key, flat[old]) if section in (now.moe.router, now.moe.expert) else flat[old]
    for name in [*ROUTER_CONFIGS, *EXPERTS]:
        saved.moe.pop(name, None)
    migrate_saved(saved)
    assert validate_config(saved).moe == now.moe
    assert moe != "upcycled" or now.moe.upcycled.noise == 0.01  # the group's own value, carried over


def test_a_knob_of_an_expert_form_not_chosen_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"moe\.upcycled\.noise: set to 0\.1, but moe\.expert=adapter"):
        validate_config(compose(["moe.upcycled.noise=0.1"]))
    with pytest.raises(ConfigError, match=r"moe\.upcycled\.train: 'half' is not one of lora, full"):
        validate_config(compose(["moe.expert=upcycled", "moe.upcycled.train=half"]))


def test_domain_check_is_off_when_domain_supervision_is():
    validate_config(compose(["moe.num_experts=3", "moe.top_k=2", "moe.domain_loss_coef=0"]))


def test_moe_layer_out_of_range_is_named():
    s = validate_config(compose(["moe.layers=[1,7]"]))
    with pytest.raises(ConfigError, match=r"moe\.layers: index 7 is out of range for a model with 4"):
        resolve_moe_layers(s.moe, 4)
    assert resolve_moe_layers(validate_config(compose(["moe.layers=[-1,0]"])).moe, 4) == [0, 3]


def test_more_checkpointed_layers_than_the_model_has_is_named_before_weights():
    from lightning_moe.models.prechecks import check_before_weights

    cfg = compose(["model.gradient_checkpointing=true", "model.gradient_checkpointing_layers=5"])
    with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing_layers: 5 > the model's 4 decoder layers"):
        check_before_weights(cfg, validate_config(cfg))


def test_bad_override_fails_fast_from_the_command_line(tmp_path):
    """A config-only mistake fails before torch is even imported (tests/guarded.py records it): fast on any machine."""
    out, report = run_guarded("moe.top_k=9", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, fresh=True)
    assert out.returncode == 2 and report["exit_code"] == 2
    assert "moe.top_k: 9 must be between 1 and moe.num_experts=4" in out.stderr
    assert not report["torch_imported"] and not report["weights_built"]
    assert not (Path(tmp_path) / "run" / "checkpoints").exists()


# Imports every module of a package with torch and transformers made unimportable: config/ must not reach the
# model stack, not even through a module that validation never happens to import; nor may the dataset converters,
# which read CSV/JSON (scripts/convert_*.py start in a fraction of a second instead of paying torch's import).
_BLOCKED_IMPORT = """
import importlib, pkgutil, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{PACKAGE} imported {name}")

PACKAGE = sys.argv[1]
sys.meta_path.insert(0, Blocked())
package = importlib.import_module(PACKAGE)
names = [m.name for m in pkgutil.walk_packages(package.__path__, PACKAGE + ".")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


@pytest.mark.parametrize("package", ["lightning_moe.config", "lightning_moe.data.converters"])
def test_every_module_of_a_torch_free_package_imports_without_torch_or_transformers(package):
    out = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, package], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) == len(list(REPO.joinpath(*package.split(".")).glob("[!_]*.py")))


def test_trainer_callbacks_and_loggers_instantiate(tmp_path):
    cfg = compose(["logger=tensorboard"], run_dir=tmp_path)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    for kind in (ModelCheckpoint, EarlyStopping, LearningRateMonitor, ThroughputMonitor):  # Lightning's, or extended
        assert any(isinstance(c, kind) for c in callbacks), kind
    assert "ExpertUsageMonitor" in {type(c).__name__ for c in callbacks}
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert sorted(type(lg).__bases__[0].__name__ if type(lg).__module__.startswith("lightning_moe") else
                  type(lg).__name__ for lg in loggers) == ["CSVLogger", "TensorBoardLogger"]
    assert any(isinstance(lg, CSVLogger) for lg in loggers) and any(isinstance(lg, TensorBoardLogger) for lg in loggers)
    OmegaConf.to_yaml(cfg)  # every interpolation resolves


@pytest.mark.parametrize("moe", sorted(p.stem for p in (REPO / "conf" / "moe").glob("*.yaml")))
def test_every_moe_config_composes_with_the_12b_recipe(moe):
    if moe == "expert_choice":  # routes within a sequence: refuses the recipe's packing, naming the key
        with pytest.raises(ConfigError, match="data.packing"):
            validate_config(compose(["+recipe=therapeutic_h100", f"moe={moe}"]))
    s = validate_config(compose(["+recipe=therapeutic_h100", f"moe={moe}"]
                                + (["data.packing=false"] if moe == "expert_choice" else [])))
    assert s.model.name_or_path == "LatitudeGames/Wayfarer-2-12B"
    if s.moe.enabled:
        assert resolve_moe_layers(s.moe, 40)


def test_a_resume_that_changes_an_expert_forms_shaping_knob_is_refused_and_one_that_does_not_is_not():
    """SHAPE_KEYS reach into a form's own section ("upcycled.train": full copies or LoRA on frozen ones shape
    different tensors); its noise only draws the start, so a resume may change it."""
    from dataclasses import asdict

    from lightning_moe.checkpointing.fingerprint import section_differences

    sections = validate_config(compose(["moe=upcycled"]))
    saved = {"moe": asdict(sections.moe), "lora": asdict(sections.lora)}
    saved["moe"]["upcycled"] = {"train": "full", "noise": 0.5}
    assert section_differences(saved, sections, 4) == ["moe.upcycled.train: full in the checkpoint, lora now"]
    saved["moe"]["upcycled"]["train"] = "lora"
    assert section_differences(saved, sections, 4) == []
    old = {k: v for k, v in saved["moe"].items() if k != "upcycled"} | {"upcycle_train": "lora"}  # before the move
    assert section_differences({"moe": old, "lora": saved["lora"]}, sections, 4) == []
