"""Reading and validating user data files (DESIGN.md §4).

Files: JSON (an array of objects, or ``{"data": [...]}``), JSON Lines, CSV, Parquet, and
folders written by ``datasets.Dataset.save_to_disk``. Columns, as the ecosystem names them:

- SFT: ``prompt`` + ``completion``, or ``messages`` (chat).
- Preference (RM, DPO, ORPO, SimPO): ``prompt``, ``chosen``, ``rejected`` (strings or messages),
  optional ``margin``.
- Unpaired (KTO): ``prompt``, ``completion``, ``label`` (bool).
- Prompts only (PPO, GRPO, RLOO): ``prompt``, plus any columns a reward function needs.

A file that names them otherwise is read with ``columns`` (ours → the file's, ``{"prompt": "question"}``).

Each ``load_*`` checks every row before training starts and raises :class:`DataError`
naming the file, the row and the field of the first problem. Data is only ever parsed
(json, csv, pyarrow), never executed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

ROLES = ("system", "user", "assistant", "tool")
SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet")

# Label spellings accepted for KTO, whatever the file format (CSV stores everything as text).
_TRUE = ("true", "1", "1.0", "yes")  # 1.0: a label column of floats, as pandas writes it to CSV
_FALSE = ("false", "0", "0.0", "no")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = 4
_short.maxlevel = 3


class DataError(ValueError):
    """A data file that cannot be used, and where: ``path``, ``row``, ``line``, ``field``.

    ``row`` is the 0-based index of the record in the file (blank JSONL/CSV lines are not
    records, and a CSV header is not a record), or None for problems with the whole file.
    ``line`` is the 1-based line of a JSON Lines (or a ``.json`` holding JSON Lines) or CSV file where that
    record starts, as an editor counts them (found in the file when not given), else None.
    ``field`` names the column, with a path into nested values such as
    ``messages[2].content``, or is None.
    """

    def __init__(self, path: str | os.PathLike, problem: str, *, row: int | None = None,
                 field: str | None = None, line: int | None = None):
        self.path = os.fspath(path)
        self.problem = problem
        self.row = row
        self.field = field
        self.line = line if line is not None or row is None else _line_of(self.path, row)
        super().__init__(f"{_place(self.path, row, field, self.line)}: {problem}")

    def __reduce__(self):  # picklable for worker processes, despite keyword-only arguments
        return _rebuild_error, (self.path, self.problem, self.row, self.field, self.line)


def _rebuild_error(path, problem, row, field, line=None) -> DataError:
    return DataError(path, problem, row=row, field=field, line=line)


def location(path: str | os.PathLike, row: int, field: str | None = None) -> str:
    """Where a DataError of ``row`` (and ``field``) of ``path`` points, for a message that is not one (a warning):
    'data.jsonl, row 16 (line 17), field 'answer''."""
    return _place(os.fspath(path), row, field, _line_of(os.fspath(path), row))


def _place(path: str, row: int | None, field: str | None, line: int | None) -> str:
    where = [path]
    if row is not None:
        where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
    if field is not None:
        where.append(f"field '{field}'")
    return ", ".join(where)


def _line_of(path: str, row: int) -> int | None:
    """The line where record ``row`` of a JSON Lines or CSV file starts (blank lines and a CSV header are not
    records); None for other files, or one that cannot be read now."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".jsonl", ".ndjson", ".csv") or not Path(path).is_file():
        return None
    try:
        text = Path(path).read_bytes().decode("utf-8-sig", errors="surrogateescape")
    except OSError:
        return None
    if suffix == ".json":  # JSON Lines under a .json name is read as such (``_parse_json``); an array has no lines
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                return None
        except RecursionError:
            return None
    if suffix != ".csv":
        starts = [lineno for lineno, _ in _jsonl_lines(text)]
        return starts[row] if row < len(starts) else None
    reader = csv.reader(io.StringIO(text, newline=""))
    with contextlib.suppress(csv.Error):
        next(reader, None)  # the header
        for i, (start, _) in enumerate(_csv_records(reader)):
            if i == row:
                return start
    return None


def _jsonl_lines(text: str) -> Iterator[tuple[int, str]]:
    """(its line number, the line) of each record of JSON Lines ``text``; blank lines are none. Split on "\n" only:
    str.splitlines would also break at U+2028 etc., legal inside JSON strings."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield lineno, line


def _csv_records(reader) -> Iterator[tuple[int, list[str]]]:
    """(the line it starts on, its values) of each record ``reader`` reads after the header; blank lines are none,
    and a quoted value may span lines. A csv.Error it raises carries ``start``, the line of the record it is in."""
    end = reader.line_num  # the line the header (then the last record) ended on: the next one starts after it
    try:
        for values in reader:
            if values:
                yield end + 1, values
            end = reader.line_num
    except csv.Error as exc:
        exc.start = end + 1
        raise


def _describe(value: Any) -> str:
    """A short, printable account of a value for 'got ...' in messages."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return _short.repr(value)
    return f"{type(value).__name__} {_short.repr(value)}"


def _printable(name: str) -> str:
    """A column name safe to print even if it holds undecodable bytes."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- reading


def read_records(path: str | os.PathLike) -> list[dict]:
    """All rows of a data file as a list of dicts, chosen by extension or folder.

    ``.json`` (array of objects or ``{"data": [...]}``; JSON Lines content is accepted too),
    ``.jsonl``/``.ndjson`` (one object per line, blank lines skipped), ``.csv`` (header row,
    all values strings), ``.parquet``, or a folder from ``Dataset.save_to_disk`` (a
    ``DatasetDict`` gives its ``train`` split, or its only split). Text files must be UTF-8.
    Raises DataError if the file is missing, unreadable, malformed or has no rows.
    """
    if not os.fspath(path):  # Path("") is the working directory: say what is missing instead
        from rlhfkit.config import ConfigError

        raise ConfigError("no data file given: pass --data FILE (or set it in the config file)")
    p = Path(path)
    if not p.exists():
        raise DataError(path, "no such file or directory")
    if p.is_dir():
        records = _read_saved_dataset(path)
    else:
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            records = _read_parquet(path)
        elif suffix in (".json", ".jsonl", ".ndjson", ".csv"):
            text = _read_text(path)
            if suffix == ".json":
                records = _parse_json(path, text)
            elif suffix == ".csv":
                records = _parse_csv(path, text)
            else:
                records = _parse_jsonl(path, text)
            _check_utf8(path, records)
        else:
            raise DataError(path, f"unknown file type '{p.suffix}'; use one of {', '.join(SUFFIXES)} "
                                  "or a folder saved by datasets.Dataset.save_to_disk")
    if not records:
        raise DataError(path, "no rows")
    return records


def _read_text(path) -> str:
    """The file decoded as UTF-8 (a BOM is dropped). Undecodable bytes are kept as lone
    surrogates so that `_check_utf8` can name the row and field that holds them."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read the file: {exc.strerror or exc}") from exc
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(path, "the file is UTF-16 encoded; save it as UTF-8")
    return data.decode("utf-8-sig", errors="surrogateescape")


class _DuplicateKey(ValueError):
    """A JSON object that gives one key twice (``json`` would keep the last value without a word)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_json(path, text: str) -> list:
    try:
        doc = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise DataError(path, f"key {_printable(exc.key)!r} is given twice in one object") from exc
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return _parse_jsonl(path, text)
        raise DataError(path, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    except RecursionError as exc:
        raise DataError(path, "not valid JSON: nested too deeply") from exc
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DataError(path, f'expected a JSON array of objects, or {{"data": [...]}}; got {_describe(doc)}')
    for row, record in enumerate(doc):
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, got {_describe(record)}", row=row)
    return doc


def _parse_jsonl(path, text: str) -> list[dict]:
    records = []
    for lineno, line in _jsonl_lines(text):
        row = len(records)
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise DataError(path, f"key {_printable(exc.key)!r} is given twice", row=row, line=lineno,
                            field=_printable(exc.key)) from exc
        except json.JSONDecodeError as exc:
            raise DataError(path, f"not valid JSON: {exc.msg} at column {exc.colno}", row=row, line=lineno) from exc
        except RecursionError as exc:
            raise DataError(path, "not valid JSON: nested too deeply", row=row, line=lineno) from exc
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, got {_describe(record)}", row=row, line=lineno)
        records.append(record)
    return records


def _parse_csv(path, text: str) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records: list[dict] = []
    try:
        header = next(reader, None)
        if header is None:
            return records
        if not all(_is_utf8(name) for name in header):
            raise DataError(path, "the header row is not valid UTF-8; save the file as UTF-8")
        if len(set(header)) != len(header):
            twice = next(name for name in header if header.count(name) > 1)
            raise DataError(path, f"column '{twice}' appears twice in the header")
        for start, values in _csv_records(reader):
            if len(values) != len(header):
                raise DataError(path, f"{len(values)} values but the header has {len(header)} columns (check "
                                      "quoting)", row=len(records), line=start)
            records.append(dict(zip(header, values)))
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
        if not hasattr(exc, "start"):  # in the header
            raise DataError(path, f"line {reader.line_num} is not valid CSV: {exc}") from exc
        raise DataError(path, f"not valid CSV: {exc}", row=len(records), line=exc.start) from exc
    return records


def _read_parquet(path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from exc
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises many types (ArrowInvalid, OSError, ...); name the file
        raise DataError(path, f"cannot read as Parquet: {exc}") from exc


def _read_saved_dataset(path) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("reading a saved dataset folder needs datasets: pip install datasets") from exc
    _check_inside(path)
    try:
        loaded = datasets.load_from_disk(os.fspath(path))
    except Exception as exc:  # FileNotFoundError, ArrowInvalid, JSON errors in state files, ...
        raise DataError(path, "a folder, but not one saved by datasets.Dataset.save_to_disk "
                              f"({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise DataError(path, f"a DatasetDict with splits {splits} and no 'train'; "
                                  f"point to one split's folder, e.g. {os.path.join(path, splits[0])}")
    return loaded.to_list()


def _check_inside(path) -> None:
    """DataError when a saved dataset's ``state.json`` names a data file outside its folder (``../``, an absolute
    path, a link out): ``load_from_disk`` would read it, and a resume's digest of the folder would not see it."""
    root = Path(path).resolve()
    for state in Path(path).rglob("state.json"):
        try:
            files = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # not datasets' state file: load_from_disk says what is wrong
        for name in files:
            target = (state.parent / str(name)).resolve()
            if root != target and root not in target.parents:
                raise DataError(path, f"{state} names a data file outside the folder ({name}); a saved dataset "
                                      "reads only files inside it")


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_utf8(path, records: list[dict]) -> None:
    """Raise DataError at the first string (key or value) that holds undecodable bytes."""
    for row, record in enumerate(records):
        stack: list[tuple[str | None, Any]] = [(None, record)]
        while stack:  # iterative: JSON may nest deeper than the recursion limit allows
            field, value = stack.pop()
            if isinstance(value, str):
                if not _is_utf8(value):
                    raise DataError(path, f"not valid UTF-8 text ({_bad_bytes(value)}); "
                                          "save the file as UTF-8", row=row, field=field)
            elif isinstance(value, dict):
                for key, item in reversed(value.items()):
                    name = key if field is None else f"{field}.{key}"
                    if not _is_utf8(key):
                        raise DataError(path, "column name is not valid UTF-8; save the file as UTF-8",
                                        row=row, field=_printable(name))
                    stack.append((name, item))
            elif isinstance(value, list):
                stack.extend((f"{field}[{i}]", item) for i, item in reversed(list(enumerate(value))))


def _bad_bytes(text: str) -> str:
    """The bytes around the first undecodable one, as Python writes bytes."""
    i = next(i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff")
    snippet = text[max(0, i - 10): i + 10]
    try:
        return repr(snippet.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate written as a \\u escape in JSON, not a raw byte
        return ascii(snippet)


# --------------------------------------------------------------------------- field checks


class _Row:
    """One record being validated, and where it came from, for error messages.

    ``columns`` maps our column names to the file's (``{"prompt": "question"}``): ``record`` holds
    the row under our names, and errors name the file's columns.
    """

    def __init__(self, path, row: int, record: dict, from_csv: bool, columns: Mapping[str, str] | None = None):
        self.path, self.row, self.from_csv = path, row, from_csv
        self.columns = dict(columns or {})
        self.file_keys = list(record)
        self.record = _renamed(self, record) if self.columns else record

    def error(self, field: str | None, problem: str) -> DataError:
        if field is not None:  # 'prompt[2].content' → 'question[2].content'
            head = re.match(r"[^\[.]*", field).group()
            field = self.columns.get(head, head) + field[len(head):]
        return DataError(self.path, problem, row=self.row, field=field)

    def present(self, key: str) -> bool:
        """The row has a value here: not absent, not null (Arrow fills missing columns with
        null), and not an empty CSV cell (CSV's only way to leave a value out)."""
        value = self.record.get(key)
        return value is not None and not (self.from_csv and value == "")

    def require(self, key: str, expected: str) -> Any:
        """The value at ``key``; absent or null is an error (an empty CSV cell is the text '')."""
        if self.record.get(key) is None:
            if key in self.record:  # there, but null (JSON null, a Parquet or datasets null)
                raise self.error(key, f"null; expected {expected}")
            columns = ", ".join(f"'{_printable(k)}'" for k in self.file_keys) or "none"
            if key in self.columns:  # the file's column --columns named for it
                hint = f" (--columns {key}={_printable(self.columns[key])} names it)"
            else:
                hint = f"; if one of them holds it, pass --columns {key}=THAT_COLUMN" if self.file_keys else ""
            raise self.error(key, f"missing; expected {expected} (columns in this row: {columns}){hint}")
        return self.record[key]

    def extras(self, standard: tuple[str, ...]) -> dict:
        """Columns outside the schema, kept as they are (e.g. for reward functions)."""
        return {k: v for k, v in self.record.items() if k not in standard}


def _renamed(row: _Row, record: dict) -> dict:
    """``record`` with the file's columns under our names (``row.columns``: ours → the file's).
    A file column already bearing one of the names taken is an error: one of the two would be lost."""
    theirs = {file_key: ours for ours, file_key in row.columns.items()}
    for ours, file_key in row.columns.items():
        if ours in record and ours != file_key and ours not in theirs:
            raise DataError(row.path, f"has a column '{_printable(ours)}' and columns.{ours} names "
                                      f"'{_printable(file_key)}' as the '{ours}' column; rename or drop one",
                            row=row.row, field=ours)
    return {theirs.get(k, k): v for k, v in record.items()}


def _string(row: _Row, value: Any, field: str, *, non_empty: bool) -> str:
    if not isinstance(value, str):
        raise row.error(field, f"expected a string, got {_describe(value)}")
    if non_empty and not value.strip():
        raise row.error(field, f"expected a non-empty string, got {_describe(value)}")
    return value


def _decode_list(row: _Row, value: Any, field: str) -> Any:
    """A JSON-encoded list (how CSV, and some exports, store messages) parsed; else as is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise row.error(field, f"expected a list of messages (JSON-encoded if stored as text), "
                               f"got {_describe(value)}") from exc


def _looks_like_messages(row: _Row, value: Any) -> Any:
    """For fields that may be text or messages: in CSV, text that parses as a JSON list of
    objects with a 'role' is taken as messages; anything else stays text."""
    if not (row.from_csv and isinstance(value, str) and value.lstrip().startswith("[")):
        return value
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return value
    if isinstance(decoded, list) and decoded and all(isinstance(m, dict) and "role" in m for m in decoded):
        return decoded
    return value


def _messages(row: _Row, value: Any, field: str, *, ends_with_reply: bool) -> list[dict]:
    """A validated chat: a non-empty list of {"role": one of ROLES, "content": str}; an assistant message may
    carry ``tool_calls`` (a list, passed to the chat template as they are; an empty one, on any message, left
    out), its content then "" when null or missing.

    With ``ends_with_reply`` the last message must be an assistant message with text or tool calls, the
    reply that training learns from.
    """
    value = _decode_list(row, value, field)
    if not isinstance(value, list) or not value:
        raise row.error(field, 'expected a non-empty list of messages {"role": ..., "content": ...}, '
                               f"got {_describe(value)}")
    messages = []
    for i, message in enumerate(value):
        at = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise row.error(at, f"expected an object with 'role' and 'content', got {_describe(message)}")
        if "role" not in message and "from" in message:
            raise row.error(at, "has 'from'/'value' (ShareGPT style); rename them to 'role'/'content' "
                                "with roles user/assistant")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise row.error(f"{at}.role", f"expected one of {', '.join(ROLES)}, got {_describe(role)}")
        calls = message.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and (role == "assistant" or not calls)):
            raise row.error(f"{at}.tool_calls", "expected a list of calls in an assistant message, got "
                                                + (_describe(calls) if role == "assistant" else f"a {role} message's"))
        if calls == []:  # an export's empty list on every message: no calls
            message = {k: v for k, v in message.items() if k != "tool_calls"}
        elif calls and message.get("content") is None:  # a reply that is its tool calls alone (OpenAI's null)
            message = {**message, "content": ""}
        _string(row, message.get("content"), f"{at}.content", non_empty=False)
        # Arrow gives every message every struct field of the column, null where unused.
        messages.append({k: v for k, v in message.items() if v is not None})
    if ends_with_reply:
        last = f"{field}[{len(messages) - 1}]"
        if messages[-1]["role"] != "assistant":
            raise row.error(f"{last}.role", "the last message must be the 'assistant' reply to learn from, "
                                            f"got {_describe(messages[-1]['role'])}")
        if not messages[-1].get("tool_calls"):  # a reply of tool calls alone may have no text
            _string(row, messages[-1]["content"], f"{last}.content", non_empty=True)
    return messages


# --------------------------------------------------------------------------- schemas


def _validate(path, convert: Callable[[_Row], dict], standard: tuple[str, ...],
              columns: Mapping[str, str] | None) -> list[dict]:
    """Every record of ``path`` through ``convert``; ``columns`` renames the file's columns to the
    ``standard`` names of this kind of data (``{"prompt": "question"}``: the file's 'question' is our 'prompt')."""
    for ours, file_key in (columns or {}).items():
        if ours not in standard:
            raise DataError(path, f"columns.{ours}: this data has no '{ours}' column to map; its columns are "
                                  f"{', '.join(standard)}")
        if not isinstance(file_key, str) or not file_key:
            raise DataError(path, f"columns.{ours}: expected the name of a column in the file, got {file_key!r}")
    if len(set((columns or {}).values())) < len(columns or {}):
        raise DataError(path, f"columns maps two of our columns to one of the file's: {dict(columns)}")
    records = read_records(path)
    from_csv = Path(path).suffix.lower() == ".csv" and not Path(path).is_dir()
    return [convert(_Row(path, i, record, from_csv, columns)) for i, record in enumerate(records)]


_SFT = ("prompt", "completion", "messages")
_SFT_TEXT = (*_SFT, "text")  # a language-modelling row's: a 'text' column beside the others is an extra (TRL too)


def _sft_row(row: _Row) -> dict:
    if row.present("messages"):
        if row.present("prompt") or row.present("completion"):
            raise row.error("messages", "the row has both 'messages' and 'prompt'/'completion'; keep one")
        messages = _messages(row, row.record["messages"], "messages", ends_with_reply=True)
        if len(messages) < 2:
            raise row.error("messages", "expected at least one message before the assistant reply")
        return {"messages": messages, **row.extras(_SFT)}
    if row.present("text") and not (row.present("prompt") or row.present("completion")):
        # language modelling (TRL's "text" rows): every token learned, after an empty prompt
        return {"prompt": "", "completion": _string(row, row.record["text"], "text", non_empty=True),
                **row.extras(_SFT_TEXT)}
    expected = "'prompt' and 'completion' strings, a 'messages' list, or a 'text' string"
    prompt = _string(row, row.require("prompt", expected), "prompt", non_empty=False)
    completion = _string(row, row.require("completion", expected), "completion", non_empty=True)
    return {"prompt": prompt, "completion": completion, **row.extras(_SFT)}


def load_sft(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> list[dict]:
    """SFT rows: ``{"prompt": str, "completion": str}`` or ``{"messages": [...]}``, extras kept; a ``{"text": str}``
    row (language modelling: every token learned) becomes ``{"prompt": "", "completion": text}``.

    ``prompt`` may be empty; ``completion`` and ``text`` may not. ``messages`` ends with a non-empty
    assistant reply after at least one other message; in CSV it is JSON-encoded text.
    """
    return _validate(path, _sft_row, _SFT_TEXT, columns)


def _reply(row: _Row, field: str, like: tuple[str, Any] | None = None) -> str | list[dict]:
    """A chosen/rejected/completion value: non-empty text, or messages ending in a reply.
    With ``like=(name, value)`` it must be the same kind as that value (text or messages)."""
    value = _looks_like_messages(row, row.require(field, "a non-empty string or a messages list"))
    if not isinstance(value, (str, list)):
        raise row.error(field, f"expected a non-empty string or a messages list, got {_describe(value)}")
    _same_kind(row, field, value, like)
    if isinstance(value, list):
        return _messages(row, value, field, ends_with_reply=True)
    return _string(row, value, field, non_empty=True)


def _same_kind(row: _Row, field: str, value: Any, like: tuple[str, Any] | None) -> Any:
    """``value``, when it is the kind (text or messages) of ``like=(name, value)``'s value (or ``like`` is None)."""
    if like is not None and isinstance(like[1], list) != isinstance(value, list):
        kind = "a messages list" if isinstance(like[1], list) else "a string"
        raise row.error(field, f"expected {kind}, as '{like[0]}' is {kind}; got {_describe(value)}")
    return value


def _prompt(row: _Row, *, non_empty: bool) -> str | list[dict]:
    value = _looks_like_messages(row, row.require("prompt", "a string or a messages list"))
    if isinstance(value, list):
        return _messages(row, value, "prompt", ends_with_reply=False)
    if not isinstance(value, str):
        raise row.error("prompt", f"expected a string or a messages list, got {_describe(value)}")
    return _string(row, value, "prompt", non_empty=non_empty)


def _split_shared_prompt(row: _Row, chosen: list[dict], rejected: list[dict]):
    """Without a 'prompt' column, full conversations share their prompt: the common leading
    messages, cut back so that both completions start at an assistant message (as TRL does)."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not (chosen[k]["role"] == rejected[k]["role"] == "assistant"):
        k -= 1
    if k == 0:
        raise row.error("prompt", "missing, and 'chosen' and 'rejected' share no leading messages "
                                  "to take it from; add a 'prompt' column")
    return chosen[:k], chosen[k:], rejected[k:]


def _number(row: _Row, field: str) -> float:
    value = row.record[field]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise row.error(field, f"expected a number, got {_describe(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise row.error(field, f"expected a number, got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise row.error(field, f"expected a finite number, got {_describe(row.record[field])}")
    return value


_PREFERENCE = ("prompt", "chosen", "rejected", "margin")


def _split_shared_text(row: _Row, chosen: str, rejected: str) -> tuple[str, str, str]:
    """Two whole texts (Anthropic HH's "Human: ... Assistant: ...") as (prompt, chosen, rejected): the prompt is
    their common beginning, less a space it ends in (which the answers keep), as TRL's ``extract_prompt`` has it,
    and never ending inside a word (answers "Calm" and "Cold" do not share a prompt "C": a word cut in two
    is tokenized as no text ever is). Their shared words count alike for both answers in a pairwise loss."""
    n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if n < min(len(chosen), len(rejected)) and (chosen[n].isalnum() or rejected[n].isalnum()):
        while n > 0 and chosen[n - 1].isalnum():
            n -= 1
    n -= n > 0 and chosen[n - 1] == " "
    if not n or n in (len(chosen), len(rejected)):
        others = [k for k in row.record if k not in _PREFERENCE]
        raise row.error("prompt", "missing: 'chosen' and 'rejected' are texts with " + (
            "no words in common to take as the prompt" if not n else "one the beginning of the other") +
            "; give the prompt in a 'prompt' column" + (
                f" (if it is the file's '{others[0]}', pass --columns prompt={others[0]})" if others else ""))
    return chosen[:n], chosen[n:], rejected[n:]


def _without_repeated_prompt(row: _Row, prompt: str | list[dict], answers: dict[str, Any]) -> tuple[Any, dict]:
    """TRL's and UltraFeedback's exports repeat the prompt at the head of each answer's conversation: where the
    answers (``{field: messages}``) all open with the prompt's messages (a text prompt: as the user's one
    message), those are taken off them, so the model does not read the prompt twice; a prompt then becomes
    messages. Otherwise they are left as they are (the loader then checks that they are the prompt's kind)."""
    if not all(isinstance(a, list) for a in answers.values()):
        return prompt, answers
    head = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def opens_with_prompt(messages):
        return len(messages) > len(head) and all(m.get("role") == h["role"] and m.get("content") == h["content"]
                                                  for m, h in zip(messages, head))

    repeats = {field: opens_with_prompt(a) for field, a in answers.items()}
    if not any(repeats.values()):
        return prompt, answers
    if not all(repeats.values()):
        lacking, having = (next(f for f, r in repeats.items() if r == want) for want in (False, True))
        raise row.error(lacking, f"does not open with the prompt's messages, as '{having}' does: give each answer "
                                 "alone or each whole conversation")
    return head, {field: a[len(head):] for field, a in answers.items()}


def _preference_row(row: _Row) -> dict:
    if row.present("prompt"):
        prompt, answers = _without_repeated_prompt(row, _prompt(row, non_empty=False),
                                                   {f: _reply(row, f) for f in ("chosen", "rejected")})
        chosen, rejected = (_same_kind(row, f, answers[f], ("prompt", prompt)) for f in ("chosen", "rejected"))
    else:
        chosen = _reply(row, "chosen")
        rejected = _reply(row, "rejected", like=("chosen", chosen))
        if isinstance(chosen, list):
            prompt, chosen, rejected = _split_shared_prompt(row, chosen, rejected)
        elif row.record.get("prompt") == "":  # an empty CSV cell: an empty prompt
            prompt = ""
        else:
            prompt, chosen, rejected = _split_shared_text(row, chosen, rejected)
    if chosen == rejected:
        raise row.error("rejected", "identical to 'chosen'; a preference pair needs two different answers")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if row.present("margin") and row.record["margin"] != "":
        out["margin"] = _number(row, "margin")
    return {**out, **row.extras(_PREFERENCE)}


def load_preference(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> list[dict]:
    """Preference rows ``{"prompt", "chosen", "rejected"[, "margin"]}``, extras kept.

    All text, or all messages: ``prompt`` a string (may be empty) or messages list, and
    ``chosen``/``rejected`` non-empty strings or messages lists ending in an assistant
    reply. Without ``prompt``, chosen/rejected are whole conversations and their shared
    leading messages, or the shared beginning of two texts (``_split_shared_text``), become the
    prompt. ``chosen == rejected`` is an error. ``margin``, if
    present, is a finite number (output as float); a row without one (or with an empty cell) has none,
    which the reward model's loss reads as 0.
    """
    return _validate(path, _preference_row, _PREFERENCE, columns)


def _label(row: _Row) -> bool:
    value = row.require("label", "true or false")
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise row.error("label", f"expected true or false (or 1/0), got {_describe(value)}")


_UNPAIRED = ("prompt", "completion", "label")


def _unpaired_row(row: _Row) -> dict:
    prompt, answers = _without_repeated_prompt(row, _prompt(row, non_empty=False),
                                               {"completion": _reply(row, "completion")})
    completion = _same_kind(row, "completion", answers["completion"], ("prompt", prompt))
    return {"prompt": prompt, "completion": completion, "label": _label(row), **row.extras(_UNPAIRED)}


def load_unpaired(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> list[dict]:
    """Unpaired (KTO) rows ``{"prompt", "completion", "label": bool}``, extras kept.

    ``prompt`` and ``completion`` as for preference data (text, or messages with the
    completion ending in an assistant reply). ``label`` is a bool, 0/1, or the text
    true/false/yes/no/1/0 (or 1.0/0.0, a CSV of floats) in any case.
    """
    return _validate(path, _unpaired_row, _UNPAIRED, columns)


_PROMPTS = ("prompt",)


def _prompts_row(row: _Row) -> dict:
    return {"prompt": _prompt(row, non_empty=True), **row.extras(_PROMPTS)}


def load_prompts(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> list[dict]:
    """Prompt rows ``{"prompt": str | messages, ...}`` for online RL; every other column
    is kept as it is, for reward functions. A text prompt must be non-empty."""
    return _validate(path, _prompts_row, _PROMPTS, columns)


LOADERS: dict[str, Callable[[str | os.PathLike], list[dict]]] = {
    "sft": load_sft,
    "preference": load_preference,
    "unpaired": load_unpaired,
    "prompts": load_prompts,
}
"""Loaders by data kind, for configs that name the kind of their data file."""
