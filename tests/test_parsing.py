"""The one parsing layer (mlxgrpo/parsing.py): nesting and size limits before the parser."""

from __future__ import annotations

import pytest

from mlxgrpo import parsing
from mlxgrpo.parsing import ParseError


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


@pytest.mark.parametrize("depth", [1, 10, parsing.MAX_DEPTH])
def test_json_up_to_the_limit_parses(depth):
    value = parsing.json_text(nested(depth), "x.json")
    for _ in range(depth - 1):
        (value,) = value
    assert value == []


@pytest.mark.parametrize("depth", [parsing.MAX_DEPTH + 1, 5_000, 100_000])
def test_json_past_the_limit_is_one_parse_error(depth):
    with pytest.raises(ParseError, match=r"x.json: nests arrays or objects more than 64"):
        parsing.json_text(nested(depth), "x.json")


def test_objects_count_as_levels_and_the_error_names_the_line():
    text = '{\n"a":\n' + '{"b":' * 70 + "1" + "}" * 70 + "\n}"
    with pytest.raises(ParseError) as caught:
        parsing.json_text(text, "c.json")
    assert caught.value.source == "c.json"
    assert "(line 3)" in caught.value.problem


def test_brackets_inside_strings_do_not_count():
    text = '{"a": "' + "[" * 500 + '", "b": "\\"' + "{" * 500 + '"}'
    assert parsing.json_text(text, "s.json") == {"a": "[" * 500, "b": '"' + "{" * 500}


def test_invalid_json_and_bytes_that_are_not_utf8():
    with pytest.raises(ParseError, match=r"p.jsonl:2: is not valid JSON \(.*line 1\)"):
        parsing.json_text('{"prompt": ', "p.jsonl:2")
    with pytest.raises(ParseError, match="is not UTF-8 text"):
        parsing.json_text(b'{"a": "caf\xe9"}', "b.json")
    assert parsing.json_text(b'{"a": "caf\xc3\xa9"}', "b.json") == {"a": "café"}


def test_size_limit_is_checked_before_parsing(tmp_path):
    with pytest.raises(ParseError, match="over the 0 MB"):
        parsing.json_text("[" + "1," * 100 + "1]", "big.json", max_bytes=100)
    path = tmp_path / "big.json"
    path.write_text("[" + "1," * 100 + "1]")
    with pytest.raises(ParseError, match="big.json: is 0.0 MB"):
        parsing.json_file(path, max_bytes=100)
    assert len(parsing.json_file(path)) == 101


def test_a_limit_above_the_interpreter_stack_is_still_a_parse_error():
    """Should a caller allow more levels than Python's parser can recurse, the RecursionError
    becomes the same one-line error."""
    with pytest.raises(ParseError, match="levels deep"):
        parsing.json_text(nested(200_000), "deep.json", max_depth=10**9)
    with pytest.raises(ParseError, match="levels deep"):
        parsing.toml_text("a = " + nested(200_000), "deep.toml", max_depth=10**9)


def test_toml_depth_ignores_strings_and_comments():
    text = (
        'a = "[[[[[[" # ' + "[" * 200 + "\n"
        "b = '''\n" + "{" * 200 + "\n'''\n"
        'c = """' + "[" * 200 + '"""\n'
        "[t]\n[[u]]\nv = [[1], [2]]\n"
    )
    table = parsing.toml_text(text, "c.toml")
    assert table["a"] == "[[[[[[" and table["b"] == "{" * 200 + "\n"
    assert table["t"] == {} and table["u"] == [{"v": [[1], [2]]}]


def test_toml_past_the_limit_names_the_line():
    text = "x = 1\n\ny = " + nested(parsing.MAX_DEPTH + 1, "[", "]") + "\n"
    with pytest.raises(ParseError, match=r"c.toml: nests .* \(line 3\)"):
        parsing.toml_text(text, "c.toml")
    with pytest.raises(ParseError, match="levels deep"):
        parsing.toml_text("y = " + nested(70, "{a = ", "}").replace("}", "1}", 1), "c.toml")


def test_invalid_toml_keeps_the_parser_message(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[rollout\n")
    with pytest.raises(ParseError, match=r"c.toml: invalid TOML: .*line 1"):
        parsing.toml_file(path)
    path.write_bytes(b"a = 1\nb = '\xff'\n")
    with pytest.raises(ParseError, match=r"is not UTF-8 text \(byte 0xff on line 2\)"):
        parsing.toml_file(path)
