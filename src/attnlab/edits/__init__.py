"""Edits: training-free changes to attention, one per file. ``EDITS`` names them; ``attnlab ls edits`` lists them.

Every public module of this package except the infrastructure (``base``, ``apply``, ``spec``) is imported on the
first lookup, so ``import attnlab.edits`` stays cheap and adding an edit never edits this file (the recipe:
:mod:`attnlab.registry`). Plug-ins register through the ``attnlab.edits`` entry-point group.
"""

from __future__ import annotations

from attnlab.registry import Registry

EDITS: Registry[type] = Registry("edit", base="attnlab.edits.base.Edit", package=__name__,
                                 infrastructure=("base", "apply", "spec"), group="attnlab.edits")


def parse_edit_spec(spec: str):  # noqa: ANN201 - re-exported from attnlab.edits.spec
    """``"NAME:key=value,..."`` → an Edit (see :mod:`attnlab.edits.spec`)."""
    from attnlab.edits.spec import parse_edit_spec as parse

    return parse(spec)


def parse_edit_list(text: str):  # noqa: ANN201
    """``"a:x=1+b:y=2"`` → the edits of one variant, composed (see :mod:`attnlab.edits.spec`)."""
    from attnlab.edits.spec import parse_edit_list as parse

    return parse(text)


__all__ = ["EDITS", "parse_edit_spec", "parse_edit_list"]
