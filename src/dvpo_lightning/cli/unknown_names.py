"""A misspelt option or class in `model` or `data` named with the class that refused it and the closest valid name.

jsonargparse reports `--model.init_args.betaa 0.2` as "Does not validate against any of the Union subtypes", with
the reason (`Option 'betaa' is not accepted`) nested under one `Parser key "..."` and one `Problem with given
class_path '...'` section per level of the option. `unknown_name_message` reads that text back into
`--model.init_args.betaa: DPOModule has no option 'betaa'; did you mean 'beta'?`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pydoc
import re
import typing

PARSER_KEY = re.compile(r'(?:- )?Parser key "([^"]+)":')
CLASS_PROBLEM = re.compile(r"(?:- )?Problem with given class_path '([^']+)':")
UNKNOWN_OPTION = re.compile(r"Option '([^']+)' is not accepted|unrecognized arguments: --([^=\s]+)")
NO_ATTRIBUTE = re.compile(r"module '([^']+)' has no attribute '([^']+)'")
NOT_IMPORT_PATH = re.compile(r"(?:- )?Expected a dot import path string: (\S+)")
# Where a short class name (`class_path: DPOModule`) of each subclass-mode section is looked up.
SHORT_NAME_PACKAGES = {"model": "dvpo_lightning.modules", "data": "dvpo_lightning.data"}


def unknown_name_message(text: str) -> str | None:
    """`--<option>: <class> has no option '<name>'; did you mean '<closest>'?` (or the same for a class name)
    from jsonargparse's error `text`; None when `text` is about something else."""
    keys: list[tuple[int, str]] = []  # (indent, key) of the `Parser key` sections enclosing the current line
    class_path = None
    for line in text.splitlines():
        indent, stripped = len(line) - len(line.lstrip()), line.strip()
        keys = [(level, key) for level, key in keys if level < indent]
        if match := PARSER_KEY.fullmatch(stripped):
            keys.append((indent, match.group(1)))
        elif match := CLASS_PROBLEM.fullmatch(stripped):
            class_path = match.group(1)
        elif (match := UNKNOWN_OPTION.search(stripped)) and class_path is not None:
            return unknown_option_message(
                [key for _, key in keys], class_path, match.group(1) or match.group(2)
            )
        elif match := NO_ATTRIBUTE.fullmatch(stripped):
            module, name = match.groups()
            return unknown_class_message([key for _, key in keys], module, name)
        elif (match := NOT_IMPORT_PATH.fullmatch(stripped)) and keys and keys[0][1] in SHORT_NAME_PACKAGES:
            return unknown_class_message(
                [key for _, key in keys], SHORT_NAME_PACKAGES[keys[0][1]], match.group(1)
            )
    return None


def option_path(keys: list[str], *names: str) -> str:
    # `model` and `data` are in subclass mode: their arguments are under `init_args`, beside `class_path`.
    in_init_args = keys and keys[0] in SHORT_NAME_PACKAGES and names != ("class_path",)
    head = [f"{keys[0]}.init_args" if in_init_args else keys[0]] if keys else []
    return "--" + ".".join([*head, *keys[1:], *names])


def unknown_option_message(keys: list[str], class_path: str, option: str) -> str:
    """`option` (dotted for a nested one: `ppo.kl_estimatr`) refused by the class at `class_path`."""
    owner = pydoc.locate(class_path)
    parts = option.split(".")
    for depth, name in enumerate(parts):
        names = option_names(owner) if inspect.isclass(owner) else {}
        if name not in names:
            owner_name = getattr(owner, "__name__", class_path)
            return (
                f"{option_path(keys, *parts)}: {owner_name} has no option '{name}'; {suggestion(name, names)}"
            )
        owner = names[name] if depth + 1 < len(parts) else None
    return f"{option_path(keys, *parts)}: not accepted by {class_path}"


def unknown_class_message(keys: list[str], module_name: str, name: str) -> str:
    module = importlib.import_module(module_name)
    names = {attribute: None for attribute in vars(module) if inspect.isclass(getattr(module, attribute))}
    if not names:
        names = {attribute: None for attribute in vars(module) if not attribute.startswith("_")}
    return f"{option_path(keys, 'class_path')}: no '{name}' in {module_name}; {suggestion(name, names)}"


def suggestion(name: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(valid)
    closest = difflib.get_close_matches(name, valid, n=2, cutoff=0.6)
    if not closest:
        return f"valid: {', '.join(valid)}"
    return f"did you mean {' or '.join(repr(close) for close in closest)}?"


def option_names(cls: type) -> dict[str, type | None]:
    """The keyword arguments of `cls`, following `**kwargs` up its bases as jsonargparse does, each with the class
    its value is built from (`ppo` -> `PPOConfig`) or None."""
    names: dict[str, type | None] = {}
    for base in cls.__mro__:
        if base is object or "__init__" not in vars(base):
            continue
        parameters = inspect.signature(base.__init__).parameters
        try:
            hints = typing.get_type_hints(base.__init__)
        except NameError:  # an annotation naming a class imported only for type checkers
            hints = {}
        for name, parameter in parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                names.setdefault(name, built_class(hints.get(name)))
        if not any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters.values()):
            break
    return names


def built_class(hint) -> type | None:
    """The class in an annotation such as `PPOConfig | None`."""
    candidates = typing.get_args(hint) or (hint,)
    classes = [
        candidate for candidate in candidates if inspect.isclass(candidate) and candidate is not type(None)
    ]
    return classes[0] if len(classes) == 1 and classes[0].__module__ != "builtins" else None
