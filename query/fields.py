"""The API's form fields as BentoML declares them, checked the way a person would explain them.

BentoML's own multipart parser answers 500 for a file under an unknown name or text where a file belongs,
and dumps raw pydantic errors for bad values. Every field is checked here first, from the same input
model BentoML builds from the endpoint's signature, so the rules are written once (in service.py).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

import annotated_types as at
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from model_store.index_artifact import ISO_DATE
from query.errors import ApiError

INTEGER = re.compile(r"-?[0-9]+")  # what "an integer" means in a form field


@dataclass(frozen=True)
class FileField:
    name: str
    many: bool  # list[Path]: several files under one name
    required: bool


@dataclass(frozen=True)
class TextField:
    name: str
    required: bool
    expected: str  # "an integer from 1 to 100", said in every error about this field
    adapter: TypeAdapter

    def check(self, value: str) -> Any:
        if value == "":
            raise ApiError(f"{self.name} is empty: send {self.expected}, or leave the field out", field=self.name)
        if not value.isprintable():
            raise ApiError(f"{self.name} holds binary or control characters: send {self.expected}",
                           field=self.name)
        try:
            parsed = self.adapter.validate_python(value)
        except ValidationError:
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise ApiError(f"{self.name} must be {self.expected}; got {shown!r}", field=self.name) from None
        # Python's numbers take "1_000" (and a typo's "1_00" as 100), and pydantic's integers "3.0", "+3" and " 3 ":
        # digits only, as the message says
        underscored = isinstance(parsed, float) and "_" in value
        not_digits = type(parsed) is int and not INTEGER.fullmatch(value)
        # pydantic also reads a date from seconds since 1970 ("0") and from a midnight time: YYYY-MM-DD only
        not_iso = isinstance(parsed, dt.date) and not ISO_DATE.fullmatch(value)
        if underscored or not_digits or not_iso or (isinstance(parsed, float) and not math.isfinite(parsed)):
            raise ApiError(f"{self.name} must be {self.expected}; got {value!r}", field=self.name)
        return parsed

    def encode(self, value: Any) -> str:
        """The value as BentoML's multipart parser reads it back (it json-decodes every text part)."""
        return json.dumps(value.isoformat() if isinstance(value, dt.date) else value)


@dataclass(frozen=True)
class EndpointFields:
    """The fields one endpoint takes, by name."""

    files: dict[str, FileField]
    texts: dict[str, TextField]

    @property
    def names(self) -> list[str]:
        return [*self.files, *self.texts]

    @classmethod
    def of(cls, input_model: Any) -> EndpointFields:
        """From a BentoML API's input model (`Service.apis[name].input_spec`)."""
        multipart = set(getattr(input_model, "multipart_fields", ()) or ())
        files, texts = {}, {}
        for name, info in input_model.model_fields.items():
            if name in multipart:
                files[name] = FileField(name, many=_is_list(info.annotation), required=info.is_required())
            else:
                texts[name] = TextField(name, info.is_required(), describe(info),
                                        TypeAdapter(_with_constraints(info)))
        return cls(files, texts)


def _is_list(annotation: Any) -> bool:
    if get_origin(annotation) is Union:
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return get_origin(annotation) is list


def _base_type(annotation: Any) -> Any:
    if get_origin(annotation) is Union:
        return next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def _with_constraints(info: FieldInfo) -> Any:
    from typing import Annotated

    base = _base_type(info.annotation)
    return Annotated[(base, *info.metadata)] if info.metadata else base


def _bounds(info: FieldInfo) -> tuple[Any, Any]:
    low = high = None
    for m in info.metadata:
        if isinstance(m, (at.Ge, at.Gt)):
            low = getattr(m, "ge", None) if isinstance(m, at.Ge) else m.gt
        if isinstance(m, (at.Le, at.Lt)):
            high = getattr(m, "le", None) if isinstance(m, at.Le) else m.lt
    return low, high


def describe(info: FieldInfo) -> str:
    """What a valid value looks like, in words: 'an integer from 1 to 100', 'a date as YYYY-MM-DD'."""
    base = _base_type(info.annotation)
    low, high = _bounds(info)
    span = (f" from {_num(low)} to {_num(high)}" if low is not None and high is not None else
            f" of at least {_num(low)}" if low is not None else
            f" of at most {_num(high)}" if high is not None else "")
    if base is int:
        return f"an integer{span}"
    if base is float:
        return f"a number{span}"
    if base is dt.date:
        return "a date as YYYY-MM-DD"
    if base is str:
        longest = next((m.max_length for m in info.metadata if isinstance(m, at.MaxLen)), None)
        return f"text of at most {longest} characters" if longest else "text"
    return f"a {getattr(base, '__name__', base)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def read_query_params(params: list[tuple[str, str]], fields: EndpointFields, path: str) -> dict[str, Any]:
    """A GET request's query parameters checked like form fields: unknown, repeated or invalid -> 400."""
    values: dict[str, Any] = {}
    for name, raw in params:
        field = fields.texts.get(name)
        if field is None:
            takes = f"use {', '.join(fields.texts)}" if fields.texts else f"GET {path} takes no query parameters"
            raise ApiError(f"unknown query parameter {name!r}: {takes}", field=name)
        if name in values:
            raise ApiError(f"{name} was sent twice: send it once", field=name)
        values[name] = field.check(raw)
    return values


def refuse_query_params(params: list[tuple[str, str]], fields: EndpointFields, path: str) -> None:
    """A POST endpoint reads its fields from the body: a query parameter it would silently ignore (`POST
    /search?k=3` answered 10 matches) is refused with a 400 that says where it belongs."""
    if not params:
        return
    name, value = params[0]
    if name in fields.files:
        raise ApiError(f"{name} was sent in the URL's query string: send the photo as a file part of the "
                       f"multipart/form-data body (curl -F {name}=@photo.jpg)", field=name)
    if name in fields.texts:
        raise ApiError(f"{name} was sent in the URL's query string, which POST {path} does not read: send it as a "
                       f"field of the multipart/form-data body (curl -F {name}={value[:40]})", field=name)
    takes = f"its fields ({', '.join(fields.names)}) go in" if fields.names else "it takes nothing in"
    raise ApiError(f"unknown query parameter {name!r}: POST {path} takes no query parameters; {takes} the "
                   "multipart/form-data body", field=name)
