"""Command-line flags derived from the config dataclasses.

A setting is a dataclass field made with `setting()`: its default, its flag
and its one help text sit together, and every verb that takes the setting
derives its flag from there. Config dataclasses nest (a TrainConfig holds a
ModelConfig and a DataConfig); each setting of the tree has a name of its own,
its flag's (`--dataset` sets DataConfig.spec under the name "dataset"), and
`build` makes a config tree from settings given by those names, as parsed
flags give them.

Nothing here imports TensorFlow: `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

_FLAG = "flag"
_DEFAULTS = "defaults"


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a setting appears on the command line."""

    flag: str  # "--batch-size"; a bool that defaults to True is turned off by its flag ("--no-augment")
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    # Flags sharing a group name exclude each other (--epochs | --steps).
    exclusive: str | None = None
    # A bool that defaults to None (decide later) gets a second flag that sets it False.
    negative: tuple[str, str] | None = None  # (flag, help)
    # What None means, for the help: "the recipe's".
    unset: str | None = None
    # The flag's text to the field's value, and back (a recipe name <-> its Recipe).
    parse: Callable[[str], Any] | None = None
    show: Callable[[Any], str] | None = None
    # Older names the flag still answers to ("--served-base" for "--export-base").
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The setting's name: its flag's, without dashes or a "no-" that turns it off."""
        return self.flag.removeprefix("--").removeprefix("no-").replace("-", "_")


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
            choices: Sequence[str] | None = None, metavar: str | None = None, exclusive: str | None = None,
            negative: tuple[str, str] | None = None, unset: str | None = None,
            parse: Callable[[str], Any] | None = None, show: Callable[[Any], str] | None = None,
            aliases: Sequence[str] = ()) -> Any:
    """A dataclass field with a flag (by default the field's name: batch_size -> --batch-size).
    Without a default, the flag is required."""
    return dataclasses.field(default=default, metadata={_FLAG: Flag(
        flag or "", help, tuple(choices) if choices is not None else None, metavar, exclusive, negative, unset,
        parse, show, tuple(aliases))})


def nested(config_class: type, **defaults: Any) -> Any:
    """A nested config field whose settings default otherwise than the class's own
    (an experiment's runs default to the paper50 recipe): `defaults` by name."""
    return dataclasses.field(default_factory=lambda: build(config_class, defaults), metadata={_DEFAULTS: defaults})


@dataclasses.dataclass(frozen=True)
class Setting:
    """One leaf of a config tree: where it sits, what it holds, and its flag if it has one."""

    path: tuple[str, ...]
    name: str
    kind: type
    default: Any
    flag: Flag | None


def _leaf_kind(annotation: Any) -> type:
    """int for `int | None`, str for `tuple[str, ...] | str`, the class for a dataclass."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        for kind in (bool, int, float):
            if kind in members:
                return kind
        return str if str in members else members[0]
    return annotation


def _is_nested(field: dataclasses.Field, kind: type) -> bool:
    """A nested config, as opposed to a setting whose value is a dataclass (a Recipe chosen by name)."""
    return dataclasses.is_dataclass(kind) and _FLAG not in field.metadata


def _settings(config_class: type, path: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None
              ) -> Iterator[Setting]:
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = _leaf_kind(hints[field.name])
        if _is_nested(field, kind):
            yield from _settings(kind, (*path, field.name), {**field.metadata.get(_DEFAULTS, {}), **(defaults or {})})
            continue
        flag = field.metadata.get(_FLAG)
        if flag is not None and not flag.flag:
            flag = dataclasses.replace(flag, flag="--" + field.name.replace("_", "-"))
        name = flag.name if flag else field.name
        default = field.default
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        if defaults and name in defaults:
            default = defaults[name]
            if flag and flag.parse and isinstance(default, str):
                default = flag.parse(default)
        yield Setting((*path, field.name), name, kind, default, flag)


def settings(config_class: type) -> list[Setting]:
    """Every leaf setting of a config tree, in field order; names are unique in a tree."""
    leaves = list(_settings(config_class))
    names = [s.name for s in leaves]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TypeError(f"{config_class.__name__}: settings named twice: {', '.join(repeated)}")
    return leaves


def build(config_class: type, values: Mapping[str, Any]):
    """A `config_class` tree from settings by name; settings not given keep their defaults.

    A text value of a setting that parses its flag's text (a recipe name) is parsed.
    A name that is no setting of the tree is refused: a misspelt one would be ignored.
    """
    leaves = {s.path: s for s in settings(config_class)}
    unknown = sorted(set(values) - {leaf.name for leaf in leaves.values()})
    if unknown:
        raise TypeError(f"{config_class.__name__} has no setting {', '.join(unknown)}")
    return _build(config_class, values, leaves, ())


def from_args(config_class: type, args: argparse.Namespace):
    """A `config_class` tree from a parsed command line: the flags of its settings
    (a verb's parser also holds flags of its own, such as -v)."""
    names = {leaf.name for leaf in settings(config_class)}
    return build(config_class, {k: v for k, v in vars(args).items() if k in names})


def _build(config_class: type, values: Mapping[str, Any], leaves: dict, path: tuple[str, ...]):
    hints = typing.get_type_hints(config_class)
    arguments = {}
    for field in dataclasses.fields(config_class):
        kind = _leaf_kind(hints[field.name])
        if _is_nested(field, kind):
            inner = {**field.metadata.get(_DEFAULTS, {}), **values}
            arguments[field.name] = _build(kind, inner, leaves, (*path, field.name))
            continue
        leaf = leaves[(*path, field.name)]
        if leaf.name not in values:
            continue
        value = values[leaf.name]
        if leaf.flag and leaf.flag.parse and isinstance(value, str):
            value = leaf.flag.parse(value)
        arguments[field.name] = value
    return config_class(**arguments)


def values(config) -> dict[str, Any]:
    """The settings of a config tree by name, as their flags would give them (a recipe by its name)."""
    result = {}
    for leaf in settings(type(config)):
        value = config
        for part in leaf.path:
            value = getattr(value, part)
        result[leaf.name] = leaf.flag.show(value) if leaf.flag and leaf.flag.show else value
    return result


def add_flags(parser: argparse.ArgumentParser, config_class: type, names: Sequence[str] | None = None,
              defaults: Mapping[str, Any] | None = None, required: Sequence[str] = ()) -> None:
    """Add the flags of a config tree's settings to `parser`: all, or those in `names`, in that order.

    `defaults` by name replace the settings' own (a verb's defaults); the flags in
    `required` must be given (a setting that is optional elsewhere).
    """
    by_name = {s.name: s for s in settings(config_class) if s.flag}
    chosen = list(by_name) if names is None else list(names)
    unknown = [n for n in chosen if n not in by_name]
    if unknown:
        raise TypeError(f"{config_class.__name__} has no flags named {', '.join(unknown)}")
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for name in chosen:
        leaf = by_name[name]
        default = (defaults or {}).get(name, leaf.default)
        target = parser
        if leaf.flag.exclusive:
            if leaf.flag.exclusive not in groups:
                groups[leaf.flag.exclusive] = parser.add_mutually_exclusive_group()
            target = groups[leaf.flag.exclusive]
        _add_flag(parser, target, leaf, dataclasses.MISSING if name in required else default)


def _help(flag: Flag, default: Any) -> str:
    # argparse %-formats help strings; the texts are plain.
    text = flag.help.replace("%", "%%")
    if default is None:
        return f"{text} (default: {flag.unset})" if flag.unset else text
    if isinstance(default, bool):
        return text
    return f"{text} (default: %(default)s)"


def _add_flag(parser, target, leaf: Setting, default: Any) -> None:
    flag = leaf.flag
    if flag.show is not None and default is not None and default is not dataclasses.MISSING:
        default = flag.show(default)
    if leaf.kind is bool:
        if flag.negative:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag.flag, dest=leaf.name, action="store_true", default=default, help=flag.help)
            group.add_argument(flag.negative[0], dest=leaf.name, action="store_false", help=flag.negative[1])
        else:
            action = "store_false" if default else "store_true"
            target.add_argument(flag.flag, dest=leaf.name, action=action, default=default, help=_help(flag, default))
        return
    names = (flag.flag, *flag.aliases)
    if default is dataclasses.MISSING:
        target.add_argument(*names, dest=leaf.name, required=True, type=_type(leaf), metavar=flag.metavar,
                            help=_help(flag, None))
        return
    target.add_argument(*names, dest=leaf.name, default=default, type=_type(leaf), choices=flag.choices,
                        metavar=flag.metavar, help=_help(flag, default))


def _type(leaf: Setting) -> type:
    # A setting that parses its text (a recipe name) is parsed in `build`, after argparse checks the choices.
    return str if leaf.flag.parse or leaf.kind not in (int, float) else leaf.kind
