"""Mistakes operators make in stack.yaml: each is refused with its place, its key path and the right fix."""

from __future__ import annotations

import pytest

from config import ConfigError, build_from_text, read_text

ECHO = 'app: {factory: "stack_support:echo_app"}\n'
PROXY_KNOWN = "(known: x_for, x_proto, x_host, x_port, x_prefix, forwarded, trusted_proxies, allowed_hosts)"
PROXYFIX = "werkzeug.middleware.proxy_fix:ProxyFix"


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    """Every problem line for a stack.yaml text named ``stack.yaml``."""
    with pytest.raises(ConfigError) as info:
        build_from_text(text, file="stack.yaml", env=env or {})
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(("key", "meant"), [
    pytest.param("x_forwarded_for", "x_for", id="x_forwarded_for"),
    pytest.param("x_forwarded_proto", "x_proto", id="x_forwarded_proto"),
    pytest.param("x_forwarded_host", "x_host", id="x_forwarded_host"),
    pytest.param("x_forwarded_port", "x_port", id="x_forwarded_port"),
    pytest.param("x_forwarded_prefix", "x_prefix", id="x_forwarded_prefix"),
    pytest.param("X-Forwarded-For", "x_for", id="the header's own spelling"),
    pytest.param("x_forwarded", "x_for", id="x_forwarded"),
])
def test_an_x_forwarded_option_is_never_taken_for_forwarded(key: str, meant: str) -> None:
    """``forwarded`` reads RFC 7239 Forwarded, which a proxy that sets X-Forwarded-For passes on from
    the client: following a hint to it would let any client choose its address."""
    assert errors_of(ECHO + f"pipeline:\n  - proxy: {{{key}: 1}}\n") == [
        f"stack.yaml:3:13 pipeline[0].proxy.{key}: unknown key {key!r}; did you mean {meant!r}? {PROXY_KNOWN}"]


@pytest.mark.parametrize(("key", "hint"), [
    pytest.param("x_forwarded_for", "; did you mean 'x_for'?", id="x_forwarded_for"),
    pytest.param("x_forwarded_server", "", id="a header with no option: no hint"),
])
def test_an_x_forwarded_option_of_werkzeugs_proxyfix(key: str, hint: str) -> None:
    assert errors_of(ECHO + f"pipeline:\n  - {PROXYFIX}: {{{key}: 1}}\n") == [
        f"stack.yaml:3:46 pipeline[0].{PROXYFIX}.{key}: unknown option {key!r} for {PROXYFIX}{hint} "
        "(known: x_for, x_proto, x_host, x_port, x_prefix)"]


def test_an_unknown_x_forwarded_header_gets_no_hint_to_forwarded() -> None:
    assert errors_of(ECHO + "pipeline:\n  - proxy: {x_forwarded_server: 1}\n") == [
        f"stack.yaml:3:13 pipeline[0].proxy.x_forwarded_server: unknown key 'x_forwarded_server' {PROXY_KNOWN}"]


@pytest.mark.parametrize(("value", "unset", "set_"), [
    pytest.param("${NOPE:-$${HOME}}", "${HOME}", "x", id="a literal ${...} as the default"),
    pytest.param("${NOPE:-a$${b}-c}", "a${b}-c", "x", id="one inside the default"),
    pytest.param("pre-${NOPE:-$${x}}-post", "pre-${x}-post", "pre-x-post", id="amid text"),
    pytest.param("${NOPE:-p$${}", "p${", "x", id="an unclosed literal ${"),
    pytest.param("${NOPE:-$$x}", "$x", "x", id="a literal $"),
])
def test_a_literal_dollar_brace_in_a_default(value: str, unset: str, set_: str) -> None:
    """``$${`` writes a literal ``${`` in a default as everywhere else, with the variable set or not."""
    text = f'a: "{value}"\n'
    assert read_text(text, env={}).data == {"a": unset}
    assert read_text(text, env={"NOPE": "x"}).data == {"a": set_}


@pytest.mark.parametrize("value", ["${A:-${B}}", "${A:-$$${B}}", "${A:-$${x}-${B}}"])
def test_a_variable_inside_a_default_is_still_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"a default may not contain another \$\{\.\.\.\}"):
        read_text(f'a: "{value}"\n', env={"A": "1", "B": "2"})


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("pipeline:\n  - cache: {ttl: 1:30}\n",
                 "stack.yaml:3:18 pipeline[0].cache.ttl: 1:30 is read by YAML as the base-60 number 90: write 90 "
                 "for that, or quote it ('1:30') to keep it as text", id="ttl: 1:30"),
    pytest.param("pipeline:\n  - session: {secret_key: '" + "s" * 40 + "', idle_timeout: 30:00}\n",
                 "stack.yaml:3:85 pipeline[0].session.idle_timeout: 30:00 is read by YAML as the base-60 number "
                 "1800: write 1800 for that, or quote it ('30:00') to keep it as text", id="idle_timeout: 30:00"),
    pytest.param("server: {channel_timeout: -1:00:00}\n",
                 "stack.yaml:2:27 server.channel_timeout: -1:00:00 is read by YAML as the base-60 number -3600",
                 id="three places, a sign"),
    pytest.param("server: {channel_timeout: 1:30.5}\n",
                 "stack.yaml:2:27 server.channel_timeout: 1:30.5 is read by YAML as the base-60 number 90.5",
                 id="a base-60 float"),
    pytest.param("pipeline:\n  - auth: {secret: 1:02:03:04:05:06}\n",
                 "stack.yaml:3:20 pipeline[0].auth.secret: the value is read by YAML as a base-60 number: quote it "
                 "to keep it as text", id="a secret's: not shown"),
])
def test_a_base_60_number_is_refused_with_both_readings(text: str, expected: str) -> None:
    """YAML 1.1 reads 1:30 as 90: a ttl written as minutes:seconds, or 30:00 meant as half an hour."""
    lines = errors_of(ECHO + text)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize("text", ["a: '1:30'\n", 'a: "30:00"\n', "a: 10:61\n", "a: 127.0.0.1:8080\n"])
def test_text_with_a_colon_is_text(text: str) -> None:
    assert isinstance(read_text(text).data["a"], str)


INDENT = ("; check the indentation of this line and the one above: the keys of one mapping start in the same "
          "column, and its values further right than their key")


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("pipeline:\n  - validation:\n    max_body_bytes: 1024\n    max_url_length: 2000\n",
                 "stack.yaml:3:5 pipeline[0]: each pipeline entry is a one-key mapping: layer name -> options; "
                 "indent the options under `validation:` (got {'validation': None, 'max_body_bytes': 1024, ",
                 id="options as deep as the layer's name"),
    pytest.param("pipeline:\n  - errors: {}\n  - cache:\n    ttl: 60\n",
                 "stack.yaml:4:5 pipeline[1]: each pipeline entry is a one-key mapping: layer name -> options; "
                 "indent the options under `cache:` (got {'cache': None, 'ttl': 60})", id="one option"),
    pytest.param("pipeline:\n  - validation:\n      max_body_bytes: 1024\n    max_url_length: 2000\n",
                 "stack.yaml:3:5 pipeline[0]: each pipeline entry is a one-key mapping: layer name -> options; "
                 "indent max_url_length under `validation:`, as far as its other options (got {'validation': ",
                 id="an option left of the one above"),
    pytest.param("pipeline:\n  - validation:\n      max_body_bytes: 1024\n     max_url_length: 2000\n",
                 "stack.yaml:5:6 (top level): invalid YAML: expected <block end>, but found '<block mapping start>' "
                 "(while parsing a block mapping at line 3, column 5)" + INDENT, id="one column left"),
    pytest.param("pipeline:\n  - versioning:\n  supported: [v1]\n",
                 "stack.yaml:4:3 (top level): invalid YAML: expected <block end>, but found '?' (while parsing a "
                 "block collection at line 3, column 3)" + INDENT, id="an option as deep as the list"),
    pytest.param("server: {ident: a}\nstores:\n  shared: memory://\n   x: 1\n",
                 "stack.yaml:5:5 (top level): invalid YAML: mapping values are not allowed here" + INDENT,
                 id="a key right of the one above"),
    pytest.param("server:\n  ident: wsgi: stack\n",
                 "stack.yaml:3:14 (top level): invalid YAML: mapping values are not allowed here; a value holding "
                 "': ' must be quoted: ident: 'wsgi: stack'", id="a colon in a value"),
])
def test_an_indentation_mistake_says_where_to_look(text: str, expected: str) -> None:
    lines = errors_of(ECHO + text)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("pipeline:\n  - cors: {origins: ['https://a.example.org', 'localhost:3000']}\n",
                 ["stack.yaml:3:47 pipeline[0].cors.origins[1]: origins entry 'localhost:3000' is not an origin"],
                 id="cors.origins"),
    pytest.param("pipeline:\n  - cors:\n      rules:\n        - {paths: [/a], origins: ['https://a.example.org/x']}\n",
                 ["stack.yaml:5:35 pipeline[0].cors.rules[0].origins[0]: rules[0].origins entry "
                  "'https://a.example.org/x' is not an origin"], id="a rule's origins"),
    pytest.param("pipeline:\n  - cors: {origins: ['https://a.example.org'], origin_regex: ['^https://a$', '(']}\n",
                 ["stack.yaml:3:78 pipeline[0].cors.origin_regex[1]: origin_regex '(' is not a valid regular "
                  "expression"], id="cors.origin_regex"),
    pytest.param("pipeline:\n  - validation: {deny_patterns: {query: ['union', '(?P<x']}}\n",
                 ["stack.yaml:3:51 pipeline[0].validation.deny_patterns.query[1]: deny_patterns['query'][1] "
                  "'(?P<x' is not a valid regular expression"], id="validation.deny_patterns"),
    pytest.param("pipeline:\n  - proxy: {x_for: 1, trusted_proxies: [10.0.0.0/8, proxy.local, 10.0.0.1/8]}\n",
                 ["stack.yaml:3:53 pipeline[0].proxy.trusted_proxies[1]: trusted_proxies entry 'proxy.local' is "
                  "not an address or CIDR network, nor 'unix'",
                  "stack.yaml:3:66 pipeline[0].proxy.trusted_proxies[2]: trusted_proxies entry '10.0.0.1/8' is "
                  "not an address or CIDR network, nor 'unix'"], id="proxy.trusted_proxies: every bad entry"),
])
def test_a_bad_list_item_is_located_at_the_item(text: str, expected: list[str]) -> None:
    lines = errors_of(ECHO + text)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), lines


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("pipeline:\n  - CORS: {}\n", "stack.yaml:3:5 pipeline[0]: unknown layer 'CORS'; did you mean 'cors'?",
                 id="a layer in capitals"),
    pytest.param("pipeline:\n  - RateLimit: {limits: [1/second]}\n",
                 "stack.yaml:3:5 pipeline[0]: unknown layer 'RateLimit'; did you mean 'ratelimit'?", id="camel case"),
    pytest.param("SERVER: {threads: 2}\n", "stack.yaml:2:1 SERVER: unknown top-level key 'SERVER'; did you mean "
                 "'server'?", id="a top-level key"),
    pytest.param("server: {Threads: 2}\n", "stack.yaml:2:10 server.Threads: unknown key 'Threads'; did you mean "
                 "'threads'?", id="an option"),
])
def test_a_name_in_other_case_gets_its_spelling(text: str, expected: str) -> None:
    lines = errors_of(ECHO + text)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize("value", ["1y", "1 year", "2yrs", "2w", "6 weeks", "6mo", "1month", "30d"])
def test_a_duration_with_a_long_unit_gets_the_plain_number_hint(value: str) -> None:
    """hsts_max_age is often thought of in years (max-age=31536000)."""
    [line] = errors_of(ECHO + f"pipeline:\n  - headers: {{hsts_max_age: {value}}}\n")
    assert line == f"stack.yaml:3:29 pipeline[0].headers.hsts_max_age: Input should be a valid integer, unable to " \
                   f"parse string as an integer; write a plain number, without a unit (seconds: 60, not 60s or 1m) " \
                   f"(got {value!r})"


@pytest.mark.parametrize(("limit", "shown"), [
    pytest.param("5/0 minutes", "'5/0 minutes'", id="5/0 minutes"),
    pytest.param("5 per 0 hours", "'5 per 0 hours'", id="per"),
    pytest.param("5/minute;3/00 hour", "'5/minute;3/00 hour'", id="the second of two"),
])
def test_a_rate_limit_over_zero_units_of_time_is_refused(limit: str, shown: str) -> None:
    """The limits library reads a period of 0 minutes as 1: 5/0 minutes would allow 5 a minute."""
    [line] = errors_of(ECHO + f"pipeline:\n  - ratelimit: {{limits: ['{limit}']}}\n")
    assert line.startswith(f"stack.yaml:3:26 pipeline[0].ratelimit.limits[0]: {shown} counts over 0 units of time; "
                           "write 1 or more ('5/minute', '5 per 2 minutes')"), line


@pytest.mark.parametrize("limit", ["5/10 minutes", "5 per 2 hours", "100/day,10/second", "5/05 minutes"])
def test_a_rate_limit_over_several_units_is_taken(limit: str) -> None:
    build_from_text(ECHO + f"pipeline:\n  - ratelimit: {{limits: ['{limit}']}}\n", file="stack.yaml", env={})


@pytest.mark.parametrize(("value", "written"), [("true", "true"), ("yes", "true"), ("false", "false")])
def test_reload_as_a_flag_gets_the_mapping_to_write(value: str, written: str) -> None:
    [line] = errors_of(ECHO + f"server:\n  reload: {value}\n")
    assert line.startswith(f"stack.yaml:3:11 server.reload: reload takes a mapping: write reload: {{watch: {written}}} "
                           "(SIGHUP re-reads the file either way; watch also polls it)"), line


def test_problems_are_listed_in_the_order_of_the_file() -> None:
    text = ("pipeline:\n  - corz: {}\nlogging: {level: LOUD}\nstores: {shared: 6379}\n" + ECHO
            + "server: {thread: 4}\n")
    lines = errors_of(text)
    assert [line.split(" ")[0] for line in lines] == ["stack.yaml:2:5", "stack.yaml:3:18", "stack.yaml:4:18",
                                                      "stack.yaml:6:10"], lines


@pytest.mark.parametrize(("text", "env", "expected"), [
    pytest.param(ECHO + 'pipeline:\n  - versioning: {supported: ["${API_VERSION}"], default: v1}\n',
                 {"API_VERSION": "v\udcff"},
                 "stack.yaml:3:30 pipeline[0].versioning.supported[0]: environment variable API_VERSION holds bytes "
                 "that are not UTF-8 text; set it to text", id="a variable holding bytes that are not UTF-8"),
    pytest.param(ECHO + 'server: {listen: "${LISTEN}"}\npipeline:\n  - errors: {}\n', {"LISTEN": "[::1\udcff]"},
                 "stack.yaml:2:18 server.listen: environment variable LISTEN holds bytes that are not UTF-8 text; "
                 "set it to text", id="such a variable in server.listen"),
    pytest.param(ECHO + "server: {backlog: 10000000000}\npipeline:\n  - errors: {}\n", {},
                 "stack.yaml:2:19 server.backlog: Input should be less than or equal to 65535 (got 10000000000)",
                 id="a backlog socket.listen() cannot take"),
])
def test_what_check_passed_and_serve_met_as_a_traceback(text: str, env: dict[str, str], expected: str) -> None:
    """(os.environ keeps bytes that are not UTF-8 as lone surrogates; listen(2**31) raises OverflowError.)"""
    assert expected in errors_of(text, env)


KNOWN_LAYERS = "(known: access_log, auth, cache"


@pytest.mark.parametrize(("name", "expected"), [
    pytest.param("stack_support.Visits", "unknown layer 'stack_support.Visits'; write 'stack_support:Visits' (your "
                 "own layers are named module:attr, with a colon before the attribute)", id="a module beside"),
    pytest.param("middleware.cors.CORSMiddleware", "unknown layer 'middleware.cors.CORSMiddleware'; write "
                 "'middleware.cors:CORSMiddleware' (your own layers are named module:attr, with a colon before the "
                 "attribute)", id="a module in a package"),
    pytest.param("stack_support.Visits.Options", "unknown layer 'stack_support.Visits.Options'; write "
                 "'stack_support:Visits.Options' (your own layers are named module:attr, with a colon before the "
                 "attribute)", id="an attribute of an attribute"),
    pytest.param("no_such_module.Thing", f"unknown layer 'no_such_module.Thing' {KNOWN_LAYERS}",
                 id="a dotted name that does not import: the known list"),
    pytest.param("stack_support.NoSuch", f"unknown layer 'stack_support.NoSuch' {KNOWN_LAYERS}",
                 id="a module without that attribute: the known list"),
])
def test_a_dotted_path_is_told_to_write_a_colon(name: str, expected: str) -> None:
    assert [line.partition(" pipeline[0]: ")[2][:len(expected)] for line in
            errors_of(ECHO + f"pipeline:\n  - {name}: {{}}\n")] == [expected]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("logging: {level: off}\n",
                 "stack.yaml:2:18 logging.level: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'; YAML reads off "
                 "as the boolean false: quote it ('off') to mean the word (got False)", id="logging.level: off"),
    pytest.param("pipeline:\n  - headers: {frame_options: no}\n",
                 "stack.yaml:3:30 pipeline[0].headers.frame_options: Input should be 'deny', 'sameorigin' or 'none'; "
                 "YAML reads no as the boolean false: quote it ('no') to mean the word (got False)",
                 id="a layer's word"),
    pytest.param("pipeline:\n  - versioning: {supported: [v1, YES], default: v1}\n",
                 "stack.yaml:3:34 pipeline[0].versioning.supported[1]: Input should be a valid string; YAML reads YES "
                 "as the boolean true: quote it ('YES') to mean the word (got True)", id="a list item"),
    pytest.param("server: {ident: On}\n",
                 "stack.yaml:2:17 server.ident: Input should be a valid string; YAML reads On as the boolean true: "
                 "quote it ('On') to mean the word (got True)", id="server.ident"),
    pytest.param("server: {ident: false}\n",
                 "stack.yaml:2:17 server.ident: Input should be a valid string (got False)",
                 id="false is meant as a boolean: no hint"),
])
def test_a_word_yaml_reads_as_a_boolean_says_so(text: str, expected: str) -> None:
    """YAML 1.1 reads yes, no, on and off as booleans: `level: off` is refused as False, which was never written."""
    assert errors_of(ECHO + text) == [expected]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("pipeline:\n  - versioning: {supported: [v1, 2.0], default: v1}\n",
                 "stack.yaml:3:34 pipeline[0].versioning.supported[1]: Input should be a valid string; YAML reads 2.0 "
                 "as a number: quote it ('2.0') to keep it as text (got 2.0)", id="a version that looks like a number"),
    pytest.param("server: {ident: 1_000}\n",
                 "stack.yaml:2:17 server.ident: Input should be a valid string; YAML reads 1_000 as a number: quote "
                 "it ('1_000') to keep it as text (got 1000)", id="a number as YAML 1.1 spells it"),
    pytest.param("pipeline:\n  - headers: {frame_options: 0x10}\n",
                 "stack.yaml:3:30 pipeline[0].headers.frame_options: Input should be 'deny', 'sameorigin' or 'none'; "
                 "YAML reads 0x10 as a number: quote it ('0x10') to keep it as text (got 16)", id="a hex number"),
    pytest.param("pipeline:\n  - cors: {origins: [2024-01-01]}\n",
                 "stack.yaml:3:22 pipeline[0].cors.origins[0]: Input should be a valid string; YAML reads 2024-01-01 "
                 "as a date: quote it ('2024-01-01') to keep it as text (got 2024-01-01)", id="a date"),
    pytest.param("server: {ident: ~}\n",
                 "stack.yaml:2:17 server.ident: Input should be a valid string; YAML reads ~ as null (no value): "
                 "quote it ('~') to keep it as text (got None)", id="a tilde"),
    pytest.param("server:\n  url_prefix:\n",
                 "stack.yaml:3:14 server.url_prefix: Input should be a valid string; the value is empty, which YAML "
                 "reads as null (no value): write '' for empty text, or leave the key out for its default (got None)",
                 id="an empty value"),
    pytest.param("server: {ident: 1.0e+3}\n",
                 "stack.yaml:2:17 server.ident: Input should be a valid string; YAML reads 1.0e+3 as a number: quote "
                 "it ('1.0e+3') to keep it as text (got 1000.0)", id="an exponent"),
    pytest.param("server: {threads: '8x'}\n",
                 "stack.yaml:2:19 server.threads: Input should be a valid integer, unable to parse string as an "
                 "integer (got '8x')", id="quoted text where a number goes: no hint"),
    pytest.param("server: {ident: null}\n",
                 "stack.yaml:2:17 server.ident: Input should be a valid string (got None)",
                 id="null is meant as null: no hint"),
    pytest.param("server: {threads: 1.5}\n",
                 "stack.yaml:2:19 server.threads: Input should be a valid integer, got a number with a fractional part "
                 "(got 1.5)", id="a number where a number goes: no hint"),
])
def test_a_value_yaml_reads_as_a_number_a_date_or_null_says_so(text: str, expected: str) -> None:
    """YAML reads 2.0, 1_000, 0x10, 2024-01-01, ~ and an empty value as numbers, dates and null: where
    text goes, the refusal says what was read and how to keep the text as written."""
    assert errors_of(ECHO + text) == [expected]


@pytest.mark.parametrize(("text", "env", "expected"), [
    pytest.param('server:\n  listen: ["${LISTEN}"]\n', {"LISTEN": "127.0.0.1:9000 127.0.0.1:9001"},
                 "stack.yaml:3:12 server.listen[0]: one address per list item: write [127.0.0.1:9000, "
                 "127.0.0.1:9001], or the addresses as one text without brackets (listen: 127.0.0.1:9000 "
                 "127.0.0.1:9001) (got '127.0.0.1:9000 127.0.0.1:9001')", id="two addresses in one list item"),
    pytest.param('server:\n  listen: ["[::1]:9000\t127.0.0.1:9001"]\n', {},
                 "stack.yaml:3:12 server.listen[0]: one address per list item: write [[::1]:9000, 127.0.0.1:9001], "
                 "or the addresses as one text without brackets (listen: [::1]:9000 127.0.0.1:9001)",
                 id="a tab between them"),
    pytest.param("server:\n  listen: ${LISTEN}\n", {"LISTEN": "[127.0.0.1:9000, 127.0.0.1:9001]"},
                 "stack.yaml:3:11 server.listen: a list written as text (a variable's value is never read as YAML): "
                 "write the addresses separated by spaces, 127.0.0.1:9000 127.0.0.1:9001 (got '[127.0.0.1:9000, "
                 "127.0.0.1:9001]')", id="a YAML list in a variable"),
    pytest.param("server:\n  listen: ${LISTEN}\n", {"LISTEN": "['[::1]:9000']"},
                 "stack.yaml:3:11 server.listen: a list written as text (a variable's value is never read as YAML): "
                 "write the addresses separated by spaces, [::1]:9000", id="one quoted item"),
])
def test_listen_entries_run_together(text: str, env: dict[str, str], expected: str) -> None:
    """Two addresses in one list item (or a list in a variable's text) were told to bracket them as one IPv6 one."""
    lines = errors_of(ECHO + text + "pipeline:\n  - errors: {}\n", env)
    assert len(lines) == 1 and lines[0].startswith(expected), lines


@pytest.mark.parametrize("listen", ["'[::1]:9000'", "'[::1]:9000 127.0.0.1:9000'", "['[::1]:9000', 127.0.0.1:9000]"])
def test_bracketed_ipv6_listen_entries_are_taken(listen: str) -> None:
    build_from_text(ECHO + f"server:\n  listen: {listen}\npipeline:\n  - errors: {{}}\n", file="stack.yaml", env={})


def test_a_bracketed_ipv6_address_without_a_port_is_told_so() -> None:
    assert errors_of(ECHO + "server:\n  listen: '[::1]'\npipeline:\n  - errors: {}\n") == [
        "stack.yaml:3:11 server.listen[0]: no :PORT follows the bracketed address; write it like [::1]:8889 "
        "(got '[::1]')"]


@pytest.mark.parametrize(("entry", "expected"), [
    pytest.param("127.0.0.1 :8889", "'127.0.0.1 ' is neither an IP address nor a host name", id="a space before :"),
    pytest.param("127.0.0.1: 8889", "the port must be a number from 1 to 65535", id="a space after :"),
    pytest.param("127.0.0.1:\u00b2", "the port must be a number from 1 to 65535", id="a digit that is not ASCII"),
])
def test_a_stray_character_in_one_address_is_named(entry: str, expected: str) -> None:
    assert errors_of(ECHO + f"server:\n  listen: ['{entry}']\npipeline:\n  - errors: {{}}\n") == [
        f"stack.yaml:3:12 server.listen[0]: {expected} (got {entry!a})"]  # (shown escaped)


NBSP_FIX = ("which YAML does not read as a space (pasted from a web page or a chat?): retype it as plain spaces, "
            "or delete it")


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("server:\n\u00a0\u00a0threads: 4\n",
                 f"stack.yaml:3:1 (top level): the key '\\xa0\\xa0threads' holds U+00A0 NO-BREAK SPACE, {NBSP_FIX}",
                 id="indented with no-break spaces"),
    pytest.param("pipeline:\n  - cache:\n      ttl: 5\n\u00a0\u00a0\u00a0\u00a0\u00a0\u00a0store: shared\n",
                 "stack.yaml:5:1 (top level): the key '\\xa0\\xa0\\xa0\\xa0\\xa0\\xa0store' holds U+00A0 NO-BREAK "
                 f"SPACE, {NBSP_FIX}", id="an option so indented"),
    pytest.param("server:\n  threads:\u00a04\n",
                 f"stack.yaml:3:3 server: the value 'threads:\\xa04' holds U+00A0 NO-BREAK SPACE, {NBSP_FIX}",
                 id="after a colon"),
    pytest.param("server: {threads:\u00a04}\n",
                 f"stack.yaml:2:10 server: the key 'threads:\\xa04' holds U+00A0 NO-BREAK SPACE, {NBSP_FIX}",
                 id="after a colon in a flow mapping"),
    pytest.param("pipeline:\n  -\u00a0errors: {}\n",
                 f"stack.yaml:3:3 pipeline: the key '-\\xa0errors' holds U+00A0 NO-BREAK SPACE, {NBSP_FIX}",
                 id="after a dash"),
    pytest.param("server:\n  \u200bthreads: 4\n",
                 f"stack.yaml:3:3 server: the key '\\u200bthreads' holds U+200B ZERO WIDTH SPACE, {NBSP_FIX}",
                 id="a zero-width space"),
    pytest.param("pipeline:\n  - auth: {secret: abc\u00a0" + "x" * 40 + "}\n",
                 f"stack.yaml:3:20 pipeline[0].auth.secret: the value holds U+00A0 NO-BREAK SPACE, {NBSP_FIX}",
                 id="a secret's: not shown"),
])
def test_a_space_yaml_does_not_read_as_one(text: str, expected: str) -> None:
    """A no-break space pasted into the file made a key nobody wrote (and left its section empty, so taken as the
    defaults), or a key and value read as one word."""
    assert errors_of(ECHO + text) == [expected]


@pytest.mark.parametrize("text", ["a: 'x\u00a0y'\n", 'a: "x\u00a0y"\n', "a: 'x\u200by'\n"])
def test_a_quoted_value_may_hold_a_no_break_space(text: str) -> None:
    assert read_text(text).data["a"].startswith("x")


@pytest.mark.parametrize(("text", "env", "expected"), [
    pytest.param('app:\n  options: {search: {engine: searxng, upstream: "htps://searx.internal/?k=${SEARXNG_TOKEN}"}}\n'
                 "pipeline:\n  - errors: {}\n", {"SEARXNG_TOKEN": "s3cr3t-value"},
                 "stack.yaml:2:49 app.options.search.upstream: URL scheme should be 'http' or 'https'",
                 id="part of a URL"),
    pytest.param('app:\n  options: {search: {engine: searxng, upstream: "${SEARXNG_PASSWORD}"}}\n'
                 "pipeline:\n  - errors: {}\n", {"SEARXNG_PASSWORD": "s3cr3t-value"},
                 "stack.yaml:2:49 app.options.search.upstream: Input should be a valid URL, relative URL without a "
                 "base", id="a whole value"),
    pytest.param(ECHO + 'pipeline:\n  - request_id: {header: "${API_TOKEN}"}\n', {"API_TOKEN": "s3cr3t value"},
                 "stack.yaml:3:26 pipeline[0].request_id.header: header '***' is not a valid HTTP header name",
                 id="quoted by the message"),
])
def test_a_value_from_a_secret_variable_is_never_shown(text: str, env: dict[str, str], expected: str) -> None:
    """A secret's variable under a key of no secret's name (a token in a URL's query, a slip of a line): the key's
    name does not hide it, the variable's does."""
    [line] = errors_of(text, env)
    assert line == expected


def test_a_value_from_another_variable_is_shown() -> None:
    assert errors_of(ECHO + 'pipeline:\n  - request_id: {header: "${REQUEST_HEADER}"}\n', {"REQUEST_HEADER": "a b"}) \
        == ["stack.yaml:3:26 pipeline[0].request_id.header: header 'a b' is not a valid HTTP header name (got 'a b')"]
