"""Reading and validating data files: every format, every schema, errors that name file/row/field."""

import csv
import json
import math
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.data.formats import (
    LOADERS,
    DataError,
    load_preference,
    load_prompts,
    load_sft,
    load_unpaired,
    read_records,
)

ROWS = [{"prompt": "2+2?", "completion": "4", "id": 1}, {"prompt": "", "completion": "hello", "id": 2}]
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def raises(loader, path, *, row, field, match=None) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        loader(path)
    err = info.value
    assert (err.path, err.row, err.field) == (str(path), row, field), str(err)
    assert str(err).startswith(str(path))
    return err


# --------------------------------------------------------------------------- DataError


def test_data_error_message_names_file_row_field():
    err = DataError("data/train.jsonl", "expected a non-empty string, got ''", row=17, field="completion")
    assert str(err) == "data/train.jsonl, row 17, field 'completion': expected a non-empty string, got ''"
    assert isinstance(err, ValueError)
    assert str(DataError("d.csv", "no rows")) == "d.csv: no rows"
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.row, again.field, str(again)) == (err.path, 17, "completion", str(err))


def test_loaders_by_name():
    assert LOADERS == {"sft": load_sft, "preference": load_preference,
                       "unpaired": load_unpaired, "prompts": load_prompts}


# --------------------------------------------------------------------------- formats


def test_read_json_array_and_data_key(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(ROWS))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"data": ROWS, "version": 1}))
    assert read_records(a) == ROWS
    assert read_records(b) == ROWS


def test_read_json_that_holds_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", ROWS)
    assert read_records(path) == ROWS


def test_read_jsonl_skips_blank_lines_and_keeps_unicode_separators(tmp_path):
    path = tmp_path / "d.jsonl"
    # U+2028 is legal raw inside a JSON string; splitting lines on it would break the row.
    path.write_text('\n{"prompt": "a\u2028b", "completion": "c"}\n\n  \n'
                    '{"prompt": "d", "completion": "e"}\r\n', encoding="utf-8")
    assert read_records(path) == [{"prompt": "a\u2028b", "completion": "c"}, {"prompt": "d", "completion": "e"}]


def test_read_csv_values_are_strings_and_bom_is_dropped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffprompt,completion,id\n\"a, b\",\"multi\nline\",1\n\n".encode("utf-8"))
    assert read_records(path) == [{"prompt": "a, b", "completion": "multi\nline", "id": "1"}]


def test_read_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert read_records(path) == ROWS


def test_read_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(tmp_path / "ds")
    assert read_records(tmp_path / "ds") == ROWS
    other = datasets.Dataset.from_list([{"prompt": "x", "completion": "y", "id": 9}])
    datasets.DatasetDict({"train": ds, "test": other}).save_to_disk(tmp_path / "dd")
    assert read_records(tmp_path / "dd") == ROWS
    datasets.DatasetDict({"test": other}).save_to_disk(tmp_path / "one")
    assert load_sft(tmp_path / "one") == [{"prompt": "x", "completion": "y", "id": 9}]
    datasets.DatasetDict({"a": ds, "b": other}).save_to_disk(tmp_path / "two")
    raises(read_records, tmp_path / "two", row=None, field=None, match="no 'train'")


def test_a_saved_dataset_naming_a_file_outside_its_folder_is_refused(tmp_path):
    import json as json_

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "secret")
    datasets.Dataset.from_list(ROWS[:1]).save_to_disk(tmp_path / "ds")
    state = tmp_path / "ds" / "state.json"
    meta = json_.loads(state.read_text())
    meta["_data_files"] = [{"filename": f"../secret/{f['filename']}"} for f in meta["_data_files"]]
    state.write_text(json_.dumps(meta))  # load_from_disk read the other folder's rows
    raises(read_records, tmp_path / "ds", row=None, field=None, match="names a data file outside the folder")


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    pytest.importorskip("datasets")  # a dependency; absent only in environments like the GPU machine's image
    (tmp_path / "plain").mkdir()
    raises(read_records, tmp_path / "plain", row=None, field=None, match="save_to_disk")


def test_missing_file_and_unknown_extension(tmp_path):
    raises(load_sft, tmp_path / "nope.jsonl", row=None, field=None, match="no such file")
    (tmp_path / "d.txt").write_text("hi")
    raises(load_sft, tmp_path / "d.txt", row=None, field=None, match=r"unknown file type '\.txt'")


@pytest.mark.parametrize("name, content", [
    ("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("e.json", "[]"), ("e.csv", ""), ("h.csv", "prompt,completion\n"),
])
def test_empty_file_has_no_rows(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    raises(load_sft, tmp_path / name, row=None, field=None, match="no rows")


def test_empty_parquet_has_no_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "e.parquet")
    raises(load_prompts, tmp_path / "e.parquet", row=None, field=None, match="no rows")


def test_not_parquet(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    (tmp_path / "d.parquet").write_text("prompt\nhi\n")
    raises(load_prompts, tmp_path / "d.parquet", row=None, field=None, match="Parquet")


def test_non_utf8_bytes_name_row_and_field(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    raises(load_sft, jsonl, row=1, field="prompt", match=r"not valid UTF-8.*xe9.*save the file as UTF-8")
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"prompt,completion\na,b\nc,d\xff\n")
    raises(load_sft, csv_path, row=1, field="completion", match="not valid UTF-8")
    chat = tmp_path / "c.json"
    chat.write_bytes(b'[{"messages": [{"role": "user", "content": "hi"}, '
                     b'{"role": "assistant", "content": "\x80"}]}]')
    raises(load_sft, chat, row=0, field="messages[1].content", match="not valid UTF-8")


def test_utf16_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("prompt\nhi\n".encode("utf-16"))
    raises(load_prompts, path, row=None, field=None, match="UTF-16")


def test_bad_json_line_names_its_row_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": }\n')
    raises(load_sft, path, row=1, field=None, match=r"d\.jsonl, row 1 \(line 3\): not valid JSON")


def test_bad_json_document(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a",\n "completion": }]')
    raises(load_sft, path, row=None, field=None, match="line 2")
    path.write_text('{"prompt": "a"}')
    raises(load_sft, path, row=None, field=None, match="JSON array of objects")


@pytest.mark.parametrize("name, content, row", [
    ("d.json", '[{"prompt": "a", "completion": "b"}, "text"]', 1),
    ("d.jsonl", '{"prompt": "a", "completion": "b"}\n[1, 2]\n', 1),
    ("d.jsonl", "null\n", 0),
])
def test_row_that_is_not_an_object(tmp_path, name, content, row):
    (tmp_path / name).write_text(content)
    raises(load_sft, tmp_path / name, row=row, field=None, match="expected a JSON object")


def test_csv_row_with_wrong_number_of_values(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    raises(load_sft, path, row=1, field=None, match=r"row 1 \(line 3\): 3 values but the header has 2")


def test_csv_duplicate_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,prompt\na,b\n")
    raises(load_prompts, path, row=None, field=None, match="'prompt' appears twice")


def test_json_key_given_twice_is_refused(tmp_path):
    # json keeps the last value without a word: an empty completion would be overwritten silently
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "", "completion": "x"}\n')
    raises(load_sft, path, row=1, field="completion", match=r"row 1 \(line 2\), field 'completion': key "
                                                             "'completion' is given twice")
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a", "completion": "b", "prompt": "c"}]')
    raises(load_sft, path, row=None, field=None, match="key 'prompt' is given twice in one object")


def test_a_row_s_error_names_the_line_an_editor_shows(tmp_path):
    # rows count records from 0; blank lines, a CSV header and a value spanning lines are not rows
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n\n{"prompt": "a", "completion": 3}\n')
    raises(load_sft, path, row=1, field="completion", match=r"d\.jsonl, row 1 \(line 4\), field 'completion'")
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"two\nlines",b\n\nc,\n')
    raises(load_sft, path, row=1, field="completion", match=r"d\.csv, row 1 \(line 5\), field 'completion'")
    path = tmp_path / "multi.csv"  # a record spanning lines: where it starts
    path.write_text('prompt,completion\na,b\n"two\nlines",b,c\n')
    raises(load_sft, path, row=1, field=None, match=r"multi\.csv, row 1 \(line 3\): 3 values")
    path = tmp_path / "lines.json"  # JSON Lines under a .json name
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": 3}\n')
    raises(load_sft, path, row=1, field="completion", match=r"lines\.json, row 1 \(line 3\), field 'completion'")
    path = tmp_path / "d.json"  # a JSON array's items: the row alone
    path.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "a", "completion": 3}]')
    assert raises(load_sft, path, row=1, field="completion", match=r"d\.json, row 1, field 'completion'").line is None


# --------------------------------------------------------------------------- SFT


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_sft_prompt_completion_keeps_extras(tmp_path, fmt):
    path = (write_jsonl if fmt == "jsonl" else write_csv)(tmp_path / f"d.{fmt}", ROWS)
    got = load_sft(path)
    ids = [1, 2] if fmt == "jsonl" else ["1", "2"]
    assert got == [{"prompt": "2+2?", "completion": "4", "id": ids[0]},
                   {"prompt": "", "completion": "hello", "id": ids[1]}]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_sft_text_rows_are_learned_whole(tmp_path, fmt):
    # TRL's language-modelling rows: an empty prompt, the text the completion (every token learned)
    path = (write_jsonl if fmt == "jsonl" else write_csv)(tmp_path / f"d.{fmt}", [{"text": "The cat is calm."}])
    assert load_sft(path) == [{"prompt": "", "completion": "The cat is calm."}]
    path = write_jsonl(tmp_path / "mapped.jsonl", [{"content": "Hello."}])
    assert load_sft(path, {"text": "content"}) == [{"prompt": "", "completion": "Hello."}]
    # beside prompt/completion or messages, a 'text' column is one more column, kept (as TRL ignores it then)
    path = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "a", "completion": "b", "text": "a b"},
                                                 {"messages": CHAT, "text": "c"}])
    assert load_sft(path) == [{"prompt": "a", "completion": "b", "text": "a b"}, {"messages": CHAT, "text": "c"}]


def test_sft_messages_from_json_and_csv(tmp_path):
    js = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT, "source": "x"}])
    assert load_sft(js) == [{"messages": CHAT, "source": "x"}]
    cs = write_csv(tmp_path / "d.csv", [{"messages": json.dumps(CHAT), "prompt": "", "completion": ""}])
    assert load_sft(cs) == [{"messages": CHAT}]  # empty CSV cells of the other format are absent


def test_a_reply_of_tool_calls_alone_is_learned_and_a_misplaced_one_refused(tmp_path):
    # OpenAI's format: the assistant's content null (or absent) beside its tool_calls
    call = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    asked = [{"role": "user", "content": "Weather in Oslo?"}]
    rows = [{"messages": [*asked, {"role": "assistant", "content": None, "tool_calls": call}]},
            {"messages": [*asked, {"role": "assistant", "tool_calls": call}, {"role": "tool", "content": "Sunny."},
                          {"role": "assistant", "content": "It is sunny."}]}]
    loaded = load_sft(write_jsonl(tmp_path / "d.jsonl", rows))
    assert loaded[0]["messages"][1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert loaded[1]["messages"][1] == {"role": "assistant", "content": "", "tool_calls": call}
    # an export's empty list on every message is no calls (helper-53: it had been refused)
    empty = [{**m, "tool_calls": []} for m in [*asked, {"role": "assistant", "content": "Sunny."}]]
    assert load_sft(write_jsonl(tmp_path / "e.jsonl", [{"messages": empty}]))[0]["messages"] == [
        *asked, {"role": "assistant", "content": "Sunny."}]
    for message, field, problem in [
        ({"role": "assistant", "content": None, "tool_calls": []}, "messages[1].content", "expected a string"),
        ({"role": "assistant", "content": "x", "tool_calls": "weather"}, "messages[1].tool_calls", "got 'weather'"),
        ({"role": "assistant", "content": None}, "messages[1].content", "expected a string, got null"),
        ({"role": "user", "content": "x", "tool_calls": call}, "messages[1].tool_calls", "got a user message's"),
    ]:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [*asked, message]}])
        raises(load_sft, path, row=0, field=field, match=problem)


def test_sft_parquet_mixed_rows_have_arrow_nulls_dropped(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    chat = [{"role": "system", "content": "be brief", "name": "sys"}] + CHAT
    path = tmp_path / "d.parquet"
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])
    schema = pa.schema([("messages", pa.list_(message)), ("prompt", pa.string()), ("completion", pa.string())])
    pq.write_table(pa.Table.from_pylist([{"messages": chat}, {"prompt": "p", "completion": "c"}], schema), path)
    got = load_sft(path)
    # Arrow adds the missing columns and struct fields as nulls; they are not data.
    assert got == [{"messages": chat}, {"prompt": "p", "completion": "c"}]
    assert "messages" not in got[1] and "prompt" not in got[0]


@pytest.mark.parametrize("row, field, match", [
    ({"prompt": "a"}, "completion", "missing; expected 'prompt' and 'completion'.*columns in this row: 'prompt'"),
    ({"prompt": "a", "completion": None}, "completion", "null; expected 'prompt' and 'completion'"),  # not missing
    ({"response": "a"}, "prompt", "missing.*'response'"),
    ({"text": " "}, "text", "non-empty"),
    ({"prompt": "a", "completion": 3}, "completion", "expected a string, got int 3"),
    ({"prompt": ["a"], "completion": "b"}, "prompt", "expected a string, got list"),
    ({"prompt": "a", "completion": ""}, "completion", "expected a non-empty string, got ''"),
    ({"prompt": "a", "completion": " \n"}, "completion", "non-empty"),
    ({"messages": CHAT[:1]}, "messages[0].role", "last message must be the 'assistant'.*got 'user'"),
    ({"messages": [CHAT[0], {"role": "assistant", "content": ""}]}, "messages[1].content", "non-empty"),
    ({"messages": [{"role": "User", "content": "a"}] + CHAT[1:]}, "messages[0].role",
     "one of system, user, assistant, tool, got 'User'"),
    ({"messages": [{"role": "user", "content": None}] + CHAT[1:]}, "messages[0].content", "got null"),
    ({"messages": [{"from": "human", "value": "hi"}]}, "messages[0]", "ShareGPT"),
    ({"messages": ["hi"]}, "messages[0]", "expected an object"),
    ({"messages": []}, "messages", "non-empty list of messages"),
    ({"messages": CHAT[1:]}, "messages", "at least one message before"),
    ({"messages": "not json"}, "messages", "JSON-encoded"),
    ({"messages": CHAT, "completion": "x"}, "messages", "both 'messages' and 'prompt'/'completion'"),
])
def test_sft_errors(tmp_path, row, field, match):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row])
    raises(load_sft, path, row=1, field=field, match=match)


def test_sft_csv_missing_column(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"prompt": "a", "response": "b"}])
    raises(load_sft, path, row=0, field="completion", match="'response'")


# --------------------------------------------------------------------------- preference


def test_preference_strings_with_margin(tmp_path):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2, "src": "a"},
            {"prompt": "q", "chosen": "good", "rejected": "worse"}]
    assert load_preference(write_jsonl(tmp_path / "d.jsonl", rows)) == [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2.0, "src": "a"},
        {"prompt": "q", "chosen": "good", "rejected": "worse"}]


def test_preference_csv_margin_text_and_empty_cell(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "0.5"},
            {"prompt": "q", "chosen": "a", "rejected": "c", "margin": ""}]
    got = load_preference(write_csv(tmp_path / "d.csv", rows))
    assert got == [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 0.5},
                   {"prompt": "q", "chosen": "a", "rejected": "c"}]


def test_preference_messages_with_prompt(tmp_path):
    row = {"prompt": CHAT[:1], "chosen": [{"role": "assistant", "content": "hi!"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}
    assert load_preference(write_jsonl(tmp_path / "d.jsonl", [row])) == [row]
    as_csv = {k: json.dumps(v) for k, v in row.items()}
    assert load_preference(write_csv(tmp_path / "d.csv", [as_csv])) == [row]


def test_preference_prompt_split_from_whole_conversations(tmp_path):
    system = {"role": "system", "content": "s"}
    chosen = [system, *CHAT, {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure"}]
    rejected = [system, *CHAT, {"role": "user", "content": "more"}, {"role": "assistant", "content": "no"}]
    got = load_preference(write_jsonl(tmp_path / "d.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert got == [{"prompt": chosen[:4], "chosen": chosen[4:], "rejected": rejected[4:]}]
    # Diverging at a user turn: the prompt stops before the last shared assistant message.
    other = [system, *CHAT, {"role": "user", "content": "else"}, {"role": "assistant", "content": "ok"}]
    got = load_preference(write_jsonl(tmp_path / "e.jsonl", [{"chosen": chosen, "rejected": other}]))
    assert got[0]["prompt"] == [system, CHAT[0]]
    assert got[0]["chosen"] == chosen[2:] and got[0]["rejected"] == other[2:]


def test_text_pairs_without_a_prompt_share_their_beginning_as_it(tmp_path):
    # Anthropic HH's rows: two whole dialogues; the prompt is what they share (TRL's extract_prompt)
    hh = {"chosen": "\n\nHuman: Is the sea cold?\n\nAssistant: Yes, in winter.",
          "rejected": "\n\nHuman: Is the sea cold?\n\nAssistant: No idea."}
    (got,) = load_preference(write_jsonl(tmp_path / "hh.jsonl", [hh]))
    assert got["prompt"] == "\n\nHuman: Is the sea cold?\n\nAssistant:"  # the space goes with the answers
    assert (got["chosen"], got["rejected"]) == (" Yes, in winter.", " No idea.")
    assert got["prompt"] + got["chosen"] == hh["chosen"] and got["prompt"] + got["rejected"] == hh["rejected"]


@pytest.mark.parametrize("chosen, rejected, prompt", [
    ("Human: hi Assistant: Calm cat.", "Human: hi Assistant: Cold cat.", "Human: hi Assistant:"),  # not ": C"
    ("Human: hi Assistant: The cat.", "Human: hi Assistant: The dog.", "Human: hi Assistant: The"),  # whole words
    ("人类：你好\n助手：好的", "人类：你好\n助手：好吗", "人类：你好\n助手："),  # no spaces: cut at the punctuation
])
def test_a_shared_beginning_is_never_cut_inside_a_word(tmp_path, chosen, rejected, prompt):
    (got,) = load_preference(write_jsonl(tmp_path / "d.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert got["prompt"] == prompt
    assert (got["prompt"] + got["chosen"], got["prompt"] + got["rejected"]) == (chosen, rejected)


@pytest.mark.parametrize("prompt", [CHAT[:1], "hi"])
def test_a_prompt_repeated_at_the_head_of_each_answer_is_read_once(tmp_path, prompt):
    # TRL's exports with an explicit prompt, and UltraFeedback binarized (a text prompt, whole conversations)
    good, bad = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "go away"}
    rows = [{"prompt": prompt, "chosen": [CHAT[0], good], "rejected": [CHAT[0], bad], "id": 7}]
    assert load_preference(write_jsonl(tmp_path / "d.jsonl", rows)) == [
        {"prompt": CHAT[:1], "chosen": [good], "rejected": [bad], "id": 7}]
    rows = [{"prompt": prompt, "completion": [CHAT[0], good], "label": True}]
    assert load_unpaired(write_jsonl(tmp_path / "k.jsonl", rows)) == [
        {"prompt": CHAT[:1], "completion": [good], "label": True}]


@pytest.mark.parametrize("row, field, match", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical to 'chosen'"),
    ({"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": CHAT[1:]}, "rejected", "identical"),
    ({"chosen": CHAT, "rejected": CHAT}, "rejected", "identical"),
    ({"prompt": "q", "rejected": "b"}, "chosen", "missing"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "rejected", "non-empty string"),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "chosen", "string or a messages list, got int 1"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "prompt", "string or a messages list, got int 5"),
    ({"prompt": "q", "chosen": CHAT[1:], "rejected": "b"}, "chosen", "as 'prompt' is a string"),
    ({"prompt": CHAT[:1], "chosen": "a", "rejected": CHAT[1:]}, "chosen", "as 'prompt' is a messages list"),
    ({"prompt": CHAT[:1], "chosen": CHAT[:1], "rejected": CHAT[1:]}, "chosen[0].role", "last message"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing: .*no words in common to take as the prompt"),
    ({"question": "Describe it.", "chosen": "Calm cat.", "rejected": "Cold cat."}, "prompt",
     "no words in common .* pass --columns prompt=question"),
    ({"prompt": CHAT[:1], "chosen": CHAT, "rejected": [{"role": "assistant", "content": "no"}]}, "rejected",
     "does not open with the prompt's messages, as 'chosen' does"),
    ({"chosen": "Q: hi A: yes", "rejected": "Q: hi A: yes!"}, "prompt", "one the beginning of the other"),
    ({"chosen": CHAT[1:], "rejected": [{"role": "assistant", "content": "x"}]}, "prompt", "share no leading"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": True}, "margin", "expected a number"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": math.inf}, "margin", "finite"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 10 ** 400}, "margin", "finite"),
])
def test_preference_errors(tmp_path, row, field, match):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    raises(load_preference, path, row=1, field=field, match=match)


# --------------------------------------------------------------------------- unpaired


@pytest.mark.parametrize("text, label", [
    ("true", True), ("False", False), (" TRUE ", True), ("1", True), ("0", False), ("yes", True), ("no", False),
    ("1.0", True), ("0.0", False),
])
def test_unpaired_label_text_from_csv(tmp_path, text, label):
    path = write_csv(tmp_path / "d.csv", [{"prompt": "q", "completion": "a", "label": text, "k": "v"}])
    assert load_unpaired(path) == [{"prompt": "q", "completion": "a", "label": label, "k": "v"}]


def test_unpaired_json_labels_and_messages(tmp_path):
    rows = [{"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "b", "label": 0},
            {"prompt": CHAT[:1], "completion": CHAT[1:], "label": "false"}]
    got = load_unpaired(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [r["label"] for r in got] == [True, False, False]
    assert all(type(r["label"]) is bool for r in got)
    assert got[2]["completion"] == CHAT[1:]


@pytest.mark.parametrize("label", ["maybe", 2, None, [True], math.nan, ""])
def test_unpaired_bad_label(tmp_path, label):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a", "label": label}])
    raises(load_unpaired, path, row=0, field="label", match="expected true or false|missing")


def test_unpaired_empty_completion(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"prompt": "q", "completion": "", "label": "1"}])
    raises(load_unpaired, path, row=0, field="completion", match="non-empty")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "", "label": 1}])
    raises(load_unpaired, path, row=0, field="completion", match="non-empty")


# --------------------------------------------------------------------------- prompts


def test_prompts_keep_extra_columns(tmp_path):
    rows = [{"prompt": "2+2?", "answer": 4}, {"prompt": CHAT[:1], "answer": 5}]
    assert load_prompts(write_jsonl(tmp_path / "d.jsonl", rows)) == rows


def test_prompts_csv_messages_and_bracketed_text(tmp_path):
    rows = [{"prompt": json.dumps(CHAT[:1]), "answer": "4"}, {"prompt": "[1, 2] + [3]?", "answer": "[1, 2, 3]"}]
    assert load_prompts(write_csv(tmp_path / "d.csv", rows)) == [
        {"prompt": CHAT[:1], "answer": "4"}, {"prompt": "[1, 2] + [3]?", "answer": "[1, 2, 3]"}]


@pytest.mark.parametrize("row, field, match", [
    ({"prompt": ""}, "prompt", "non-empty"),
    ({"question": "a"}, "prompt", "missing.*'question'"),
    ({"prompt": {"text": "a"}}, "prompt", "string or a messages list, got dict"),
    ({"prompt": [{"role": "robot", "content": "a"}]}, "prompt[0].role", "got 'robot'"),
])
def test_prompts_errors(tmp_path, row, field, match):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, row])
    raises(load_prompts, path, row=1, field=field, match=match)


# --------------------------------------------------------------------------- properties

STANDARD_KEYS = ["prompt", "completion", "messages", "chosen", "rejected", "label", "margin", "extra"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
           | st.sampled_from(["", " ", "true", "0", "[]", "[{}]", "nan", "1e999"]))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
message = st.dictionaries(st.sampled_from(["role", "content", "name", "from"]),
                          st.sampled_from(["user", "assistant", "system", "bot"]) | scalars, max_size=3)
value = anything | st.lists(message, max_size=4) | st.sampled_from([CHAT, CHAT[:1], CHAT[1:]])
row_strategy = st.dictionaries(st.sampled_from(STANDARD_KEYS), value, max_size=6)
rows_strategy = st.lists(row_strategy | anything, max_size=4)
prop = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

REQUIRED = {load_sft: (), load_preference: ("prompt", "chosen", "rejected"),
            load_unpaired: ("prompt", "completion", "label"), load_prompts: ("prompt",)}


def check_loaders(path, *, rows_given: int | None):
    """Every loader either returns records with its schema's keys or raises DataError naming
    the file; with ``rows_given`` rows in a well-formed file, every error names its row."""
    for loader, required in REQUIRED.items():
        try:
            records = loader(path)
        except DataError as err:
            assert err.path == str(path)
            if rows_given is not None:
                assert (err.row is None) == (rows_given == 0), str(err)
                assert err.row is None or 0 <= err.row < rows_given
        else:
            assert records and all(set(required) <= r.keys() for r in records)
            if loader is load_sft:
                assert all(("messages" in r) != ("completion" in r) for r in records)


@prop
@given(rows=rows_strategy, fmt=st.sampled_from(["json", "jsonl"]))
def test_property_random_rows_only_raise_data_error(tmp_path, rows, fmt):
    path = tmp_path / f"d.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_loaders(path, rows_given=len(rows))


@prop
@given(cells=st.lists(st.fixed_dictionaries({}, optional={
    k: st.text(max_size=8) | st.sampled_from(["", "true", "2", "nan", json.dumps(CHAT), json.dumps(CHAT[:1]),
                                              "[{\"role\": 1}]", "[", "[[[[1]]]]"])
    for k in STANDARD_KEYS}), min_size=1, max_size=4))
def test_property_random_csv_cells_only_raise_data_error(tmp_path, cells):
    header = sorted({k for row in cells for k in row}) or ["prompt"]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[row.get(k, "") for k in header] for row in cells])
    check_loaders(path, rows_given=len(cells))


@prop
@given(lines=st.lists(st.binary(max_size=24) | st.sampled_from([b'{"prompt": "\xff"}', b"{", b"[1]", b"\x00"]),
                      max_size=5),
       fmt=st.sampled_from(["json", "jsonl", "csv"]))
def test_property_random_bytes_only_raise_data_error(tmp_path, lines, fmt):
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(b"\n".join(lines))
    check_loaders(path, rows_given=None)


@prop
@given(columns=st.dictionaries(st.sampled_from(STANDARD_KEYS), st.sampled_from([
    st.text(max_size=6) | st.none(), st.integers(-2, 2) | st.none(), st.booleans(), st.floats(allow_nan=True),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "bot"]),
                                    "content": st.text(max_size=4)}), max_size=3)]), min_size=1, max_size=5),
       n_rows=st.integers(1, 4), data=st.data())
def test_property_random_parquet_columns_only_raise_data_error(tmp_path, columns, n_rows, data):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = {k: data.draw(st.lists(strategy, min_size=n_rows, max_size=n_rows)) for k, strategy in columns.items()}
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table(table), path)  # one type per column, as Arrow requires
    check_loaders(path, rows_given=n_rows)


# a trainer reads its data through a loader before anything else: malformed rows end the command
# with the loader's one-line error (exit code 2), never a traceback and never a model load
TRAINERS = [("sft", "--data", load_sft, []), ("rm", "--data", load_preference, []),
            ("dpo", "--data", load_preference, []), ("kto", "--data", load_unpaired, []),
            ("ppo", "--prompts", load_prompts, ["--reward_model", "no-reward-model"]),
            ("grpo", "--prompts", load_prompts, ["--rewards", "rlhfkit.data.tasks.arithmetic:answer_format"])]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows_strategy, trainer=st.sampled_from(TRAINERS))
def test_property_trainers_stop_on_malformed_rows_naming_file_row_field(tmp_path, capsys, rows, trainer):
    from hypothesis import assume

    from rlhfkit.cli import main

    command, flag, loader, extra = trainer
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        loader(path)
        assume(False)  # well-formed for this trainer: nothing to check here
    except DataError as err:
        expected = str(err)
    capsys.readouterr()
    code = main([command, "--model", str(tmp_path / "no-model"), flag, str(path), "--out", str(tmp_path / "out"),
                 *extra])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"rlhfkit {command}: {expected}"
    assert not (tmp_path / "out").exists()  # stopped before the run directory was made


# --------------------------------------------------------------------------- column mapping


def test_columns_map_the_files_names_to_ours(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4", "id": 1}])
    assert load_sft(path, {"prompt": "question", "completion": "answer"}) == [
        {"prompt": "2+2?", "completion": "4", "id": 1}]
    # a prompts file keeps its other columns for reward functions, the mapped one under our name only
    assert load_prompts(path, {"prompt": "question"}) == [{"prompt": "2+2?", "answer": "4", "id": 1}]
    pairs = write_csv(tmp_path / "p.csv", [{"q": "hi", "good": "hello", "bad": "go away"}])
    assert load_preference(pairs, {"prompt": "q", "chosen": "good", "rejected": "bad"}) == [
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"}]
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "hi", "completion": "yo", "thumbs_up": 0}])
    assert load_unpaired(unpaired, {"label": "thumbs_up"})[0]["label"] is False
    # two of our names swapped is a mapping too
    assert load_preference(pairs, {"prompt": "q", "chosen": "bad", "rejected": "good"})[0]["chosen"] == "go away"


def test_column_errors_name_the_files_column(tmp_path):
    columns = {"prompt": "question", "completion": "answer"}
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}, {"question": "c", "answer": 5}])
    err = raises(lambda p: load_sft(p, columns), path, row=1, field="answer", match="expected a string")
    assert "completion" not in str(err)
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"q": [{"role": "robot", "content": "hi"}]}])
    raises(lambda p: load_prompts(p, {"prompt": "q"}), chats, row=0, field="q[0].role")
    missing = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}])
    err = raises(lambda p: load_prompts(p, {"prompt": "question"}), missing, row=0, field="question")
    assert "'text'" in str(err) and "pass --columns" not in str(err)  # the row's columns as the file names them
    assert "(--columns prompt=question names it)" in str(err)
    err = raises(load_prompts, missing, row=0, field="prompt")
    assert "pass --columns prompt=THAT_COLUMN" in str(err)


def test_bad_column_mappings_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "a", "question": "b", "completion": "c"}])
    raises(lambda p: load_sft(p, {"chosen": "question"}), path, row=None, field=None,
           match="no 'chosen' column to map; its columns are prompt, completion, messages")
    raises(lambda p: load_sft(p, {"prompt": "question", "completion": "question"}), path, row=None, field=None,
           match="two of our columns to one")
    raises(lambda p: load_sft(p, {"prompt": ""}), path, row=None, field=None, match="expected the name of a column")
    # the file also has a column under the name taken: one of the two would be lost
    raises(lambda p: load_sft(p, {"prompt": "question"}), path, row=0, field="prompt",
           match="has a column 'prompt' and columns.prompt names 'question'")
