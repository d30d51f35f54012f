"""The config groups state only what differs from the schema: a value restated in conf/{model,data,lora,moe,optim}
equal to its default in lightning_moe/config/schema.py would silently override a default changed there. What a knob
does is said once, next to its schema field."""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields, is_dataclass

import pytest
import yaml
from conftest import REPO

from lightning_moe.config.schema import SCHEMAS


def _defaults(schema) -> dict:
    out = {}
    for f in fields(schema):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
            out[f.name] = asdict(value) if is_dataclass(value) else value  # a router's section: moe.deepseek.*
    return out


def _merge(base: dict, over: dict) -> dict:
    """`over` on `base`, sections merged key by key (as Hydra merges a group option onto the schema)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _restated(own: dict, inherited: dict, prefix: str = "") -> dict:
    """The keys of `own` (inside sections too) whose value equals what they inherit."""
    out = {}
    for k, v in own.items():
        if isinstance(v, dict) and isinstance(inherited.get(k), dict):
            out |= _restated(v, inherited[k], f"{prefix}{k}.")
        elif k in inherited and inherited[k] == v:
            out[prefix + k] = v
    return out


def _own(group: str, name: str) -> tuple[dict, list[str]]:
    raw = yaml.safe_load((REPO / "conf" / group / f"{name}.yaml").read_text()) or {}
    parents = [d for d in raw.pop("defaults", []) if d != "_self_"]
    return raw, parents


def _effective(group: str, name: str) -> dict:
    """The group option's values as Hydra composes them: the schema, its parents (defaults list), then its own."""
    own, parents = _own(group, name)
    values = _defaults(SCHEMAS[group])
    for parent in parents:
        values = _merge(values, _effective(group, parent))
    return _merge(values, own)


CASES = [(g, p.stem) for g in SCHEMAS for p in sorted((REPO / "conf" / g).glob("*.yaml"))]


@pytest.mark.parametrize("group, name", CASES, ids=[f"{g}/{n}" for g, n in CASES])
def test_a_config_group_states_only_what_differs_from_what_it_builds_on(group, name):
    own, parents = _own(group, name)
    inherited = _defaults(SCHEMAS[group])
    for parent in parents:
        inherited = _merge(inherited, _effective(group, parent))
    restated = _restated(own, inherited)
    assert not restated, (f"conf/{group}/{name}.yaml restates {restated}: equal to "
                          f"{'its parent' if parents else 'the schema default'}; leave them out")


def test_a_restated_default_inside_a_router_section_is_found():
    inherited = _defaults(SCHEMAS["moe"])
    assert _restated({"router": "deepseek", "deepseek": {"n_group": 1, "bias_update_rate": 0.001}}, inherited) == \
        {"deepseek.n_group": 1}
