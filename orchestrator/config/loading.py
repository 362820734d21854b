"""Loading a config: job files, ``key.sub=value`` overrides, validation with error messages that
name the key, the value and the allowed choices, and dumping with secrets masked."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from orchestrator.config.schema import ConfigError, TrainConfig



def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}=...: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(arg: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key.sub, parsed value). Values are parsed as YAML scalars."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form key.sub=value (e.g. optim.lr=3e-4)")
    key, raw = arg.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override {arg!r}: {key!r} is not a dotted key like optim.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # Scientific notation without a dot ("3e-4") is a string in YAML 1.1; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            pass
    return key, value


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return sorted(cls.model_fields)


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            lines.append(f"  {key}: unknown key. Allowed keys here: {', '.join(allowed)}")
            continue
        if e["type"] == "finite_number":
            lines.append(f"  {key}: must be a finite number, got {e['input']}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if "input" in e and e["type"] != "value_error" and not isinstance(e["input"], dict):
            lines.append(f"  {key}={e['input']!r}: {msg}")
        else:
            lines.append(f"  {key}: {msg}" if key != "(root)" else f"  {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _read_config_file(p: Path) -> Any:
    """The job file's parsed YAML; anything that is not a readable YAML text file is a one-line error."""
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory. Fix: pass a YAML job file (see jobs/*.yaml)")
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist (see jobs/ for examples)")
    if not p.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"config file {str(p)!r} is not a regular file. Fix: pass a YAML job file (see jobs/*.yaml)")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not a text file (byte {e.start} is not UTF-8). Fix: pass a "
                          "YAML job file (see jobs/*.yaml)") from None
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({e.strerror or e}). Fix: check its "
                          "permissions, or pass another file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        # PyYAML's messages span several lines; keep the problem and where it is.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {problem}{where}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                schema: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Read a YAML job file (optional), apply ``key.sub=value`` overrides and validate against
    ``schema`` (``TrainConfig``, or a subclass that adds sections, like ``raydiff tune``'s)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = _read_config_file(p)
        if loaded is None:
            # Most often a file saved before it was written, or the wrong file: training the full
            # default demo into runs/demo instead would hide that.
            raise ConfigError(f"config file {str(p)!r} is empty (or only comments). Fix: give the settings that "
                              "differ from the defaults (see jobs/*.yaml), or leave out --config to train with the defaults")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    return validate_config(apply_overrides(tree, overrides), schema)


def apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set each ``key.sub=value`` in the nested ``tree`` (in place) and return it."""
    for arg in overrides:
        key, value = parse_override(arg)
        _set_path(tree, key, value)
    return tree


def validate_config(tree: dict[str, Any], schema: type[TrainConfig] = TrainConfig) -> TrainConfig:
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, schema)) from None


def config_to_dict(cfg: TrainConfig, *, reveal_secrets: bool = False) -> dict[str, Any]:
    """Plain dict of the resolved config. Secrets are masked unless ``reveal_secrets``
    (only for handing the config to Ray workers in memory, never for writing it out)."""
    data = cfg.model_dump(mode="python")

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, SecretStr):
            return node.get_secret_value() if reveal_secrets else "**********"
        return node

    return fix(data)


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def load_config_text(text: str) -> TrainConfig:
    """Validate a config saved with a run or checkpoint (secrets there are masked)."""
    tree = yaml.safe_load(text) or {}
    if "s3" in (tree.get("data") or {}):  # saved before storage.s3 existed
        tree.setdefault("storage", {})["s3"] = tree["data"].pop("s3")
    s3 = tree.get("storage", {}).get("s3", {})
    for key in ("access_key_id", "secret_access_key", "session_token"):
        if s3.get(key) == "**********":
            s3[key] = None  # masked on save: fall back to the environment's credential chain
    return validate_config(tree)
