"""Secrets never travel in what check, serve, reload and the operator page print about a file.

Each case is a stack.yaml with one mistake near a secret: the mistake is still reported where it is
(file:line:col, key path), and the secret is not in any line of the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import check
from middleware.operator_page import mask

ECHO = 'app: {factory: "stack_support:echo_app"}\n'
SEARCH = ("app: {{factory: 'app:create_app', options: {{var_dir: {var}, "
          "search: {{engine: searxng, upstream: '{url}'}}}}}}\n")
ERRORS = "pipeline:\n  - errors: {}\n"
#: An RSA private key as a JWK whose "alg" no library knows: PyJWT's error text prints the whole key.
PRIVATE_JWK = {"kty": "RSA", "kid": "k1", "alg": "RSA256", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bO",
               "e": "AQAB", "d": "SEKRETprivateExponentd0123456789"}


@pytest.mark.parametrize(("text", "secret", "reported"), [
    pytest.param(ECHO + "stores: {shared: 'redis:/:SEKRETpw1@redis.internal:6379/0'}\n" + ERRORS, "SEKRETpw1",
                 "stack.yaml:2:18 stores.shared: store URL 'redis:***@redis.internal:6379/0' has no scheme",
                 id="a store URL with one slash"),
    pytest.param(ECHO + "stores: {shared: ':SEKRETpw2@redis.internal:6379'}\n" + ERRORS, "SEKRETpw2",
                 "stack.yaml:2:18 stores.shared: store URL ':***@redis.internal:6379' has no scheme",
                 id="a store URL without a scheme"),
    pytest.param(ECHO + "pipeline:\n  - auth: SEKRETpw3-0123456789012345678901234567890\n", "SEKRETpw3",
                 "stack.yaml:3:11 pipeline[0].auth: layer options must be a mapping, not a str",
                 id="the secret where the options go"),
    pytest.param(SEARCH.format(var="var", url="searx:SEKRETpw4@searx.internal") + ERRORS, "SEKRETpw4",
                 "app.options.search.upstream: URL scheme should be 'http' or 'https' (got 'searx:***@searx.internal')",
                 id="an upstream's password without a scheme"),
    pytest.param(SEARCH.format(var="var", url="searx.internal/?token=SEKRETpw5") + ERRORS, "SEKRETpw5",
                 "(got 'searx.internal/?token=***')", id="an upstream's token without a scheme"),
    pytest.param(ECHO + "pipeline:\n  - auth: {secret: '${JWT_SECRET:SEKRETpw6-0123456789012345678901234}'}\n",
                 "SEKRETpw6", "pipeline[0].auth.secret: '${JWT_SECRET:…}' is not an interpolation",
                 id="a secret's default in a misspelt interpolation"),
    pytest.param(ECHO + "pipeline:\n  - auth: {jwks_file: keys.json, algorithm: RS256}\n", "SEKRETprivate",
                 "pipeline[0].auth.jwks_file: jwks_file key k1 cannot be used: Unable to find an algorithm for key",
                 id="a private key PyJWT cannot use"),
    pytest.param(ECHO + "pipeline:\n  - auth: {public_keys: [SEKRETpw7-hmac-Xy9Qz7Lm2Np4Rt6Vw8]}\n", "SEKRETpw7",
                 "pipeline[0].auth.public_keys: a public_keys entry: cannot read '",
                 id="a secret put where a public key's file goes"),
    pytest.param(ECHO + "pipeline:\n  - session: {secret_key: !!int SEKRETpw8-literal}\n", "SEKRETpw8",
                 "stack.yaml:3:27 pipeline[0].session.secret_key: cannot read the value as !!int; quote it to keep "
                 "it as text", id="a secret with a tag it does not fit"),
    pytest.param(ECHO + "pipeline:\n  - session: {secret_key: 01234567012345670123456701234567}\n",
                 "1234567012345670123456701234567",
                 "stack.yaml:3:27 pipeline[0].session.secret_key: the value is read by YAML as an octal number: quote "
                 "it to keep it as text", id="a secret with a leading zero"),
    pytest.param(ECHO + "pipeline:\n  - auth: {secret: !!float SEKRETpw9}\n", "SEKRETpw9",
                 "pipeline[0].auth.secret: cannot read the value as !!float; quote it", id="nor what int() says of it"),
    pytest.param(ECHO + "pipeline:\n  - auth: {secret:SEKRETpw10-0123456789012345678901234}\n", "SEKRETpw10",
                 "stack.yaml:3:12 pipeline[0].auth.secret:***: unknown key 'secret:***'; YAML needs a space after the "
                 "colon: write secret: ***", id="a secret without a space after its colon"),
    pytest.param(ECHO + "pipeline:\n  - werkzeug.middleware.proxy_fix:ProxyFix: {token:SEKRETpw11}\n", "SEKRETpw11",
                 "stack.yaml:3:46 pipeline[0].werkzeug.middleware.proxy_fix:ProxyFix.token:***: unknown option "
                 "'token:***' for", id="a factory's secret without a space after its colon"),
    pytest.param(ECHO + "stores: {shared: {url: 'redis://h/0', options: {password:SEKRETpw12}}}\n" + ERRORS,
                 "SEKRETpw12", "stack.yaml:2:18 stores.shared: bad option for Redis store redis://h/0: ",
                 id="a store's password without a space after its colon"),
    pytest.param(SEARCH.format(var="var", url="https://searx.internal").replace("}}}", ", token:SEKRETpw13}}}")
                 + ERRORS, "SEKRETpw13", "app.options.search.token:***: unknown key 'token:***'",
                 id="an app option's token without a space after its colon"),
    pytest.param(ECHO + "pipeline:\n  - auth:{secret:SEKRETpw14-0123456789012345678901234}\n", "SEKRETpw14",
                 "stack.yaml:3:5 pipeline[0]: 'auth:{…}' is read as one name: YAML needs a space after the colon; "
                 "write - auth: {…}", id="a layer's secret and no space after the layer's colon"),
    pytest.param(ECHO + "pipeline:\n  - auth:\n      secret: SEKRETpw15: 0123456789012345678901234\n", "SEKRETpw15",
                 "stack.yaml:4:25 (top level): invalid YAML: mapping values are not allowed here; a value holding ': ' "
                 "must be quoted: secret: '…'", id="a secret holding a colon and a space"),
    pytest.param(ECHO + "pipeline:\n  - auth: {public_keys: [keys/missing.pem]}\n", "never in the report",
                 "pipeline[0].auth.public_keys: a public_keys entry: cannot read '{folder}/keys/missing.pem'",
                 id="a key file's name is no secret: shown"),
])
def test_a_mistake_near_a_secret_is_reported_without_it(tmp_path: Path, text: str, secret: str,
                                                        reported: str) -> None:
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [PRIVATE_JWK]}))
    path = tmp_path / "stack.yaml"
    path.write_text(text)
    found = [str(p).replace(str(path), "stack.yaml") for p in check(path, env={})]
    reported = reported.replace("{folder}", str(tmp_path))
    assert any(reported in line for line in found), found
    assert not any(secret in line for line in found), found


@pytest.mark.parametrize(("entry", "reported"), [
    pytest.param("request_id: {pattern: '${SEARXNG_TOKEN}'}",
                 "stack.yaml:3:27 pipeline[0].request_id.pattern: pattern '***' is not a valid regular expression",
                 id="printed as it is"),
    pytest.param("versioning: {supported: [v1], default: '${SEARXNG_TOKEN}'}",
                 "stack.yaml:3:44 pipeline[0].versioning.default: default '***' is not in supported (v1)",
                 id="printed as the option reads it (versions are lowercased)"),
])
def test_a_secret_variables_value_is_not_in_a_problem_it_causes(tmp_path: Path, entry: str, reported: str) -> None:
    """A variable named as a secret (``*_TOKEN``) put where an option prints its value: the value is masked,
    also in another case than it was set in."""
    path = tmp_path / "stack.yaml"
    path.write_text(ECHO + f"pipeline:\n  - {entry}\n")
    found = [str(p).replace(str(path), "stack.yaml") for p in check(path, env={"SEARXNG_TOKEN": "SEKRETenv1(x"})]
    assert any(reported in line for line in found), found
    assert not any("sekretenv1" in line.lower() for line in found), found


@pytest.mark.parametrize(("options", "shown"), [
    pytest.param({"dsn": "postgres://app:SEKRET#pw@db/x"}, {"dsn": "postgres://app:•••@db/x"},
                 id="a password with a # in a URL"),
    pytest.param({"upstream": "searx:SEKRET@searx.internal"}, {"upstream": "searx:•••@searx.internal"},
                 id="userinfo without a scheme"),
    pytest.param({"headers": [["Authorization", "Bearer SEKRET"], ["Accept", "text/html"]]},
                 {"headers": [["Authorization", "•••"], ["Accept", "text/html"]]}, id="a header given as a pair"),
    pytest.param({"url": "https://h/x?api_key=SEKRET&page=2"}, {"url": "https://h/x?api_key=•••&page=2"},
                 id="a key in a query"),
    pytest.param({"dsn": "host=db user=app password=SEKRET dbname=x"},
                 {"dsn": "host=db user=app password=••• dbname=x"}, id="a libpq connection string"),
    pytest.param({"odbc": "Server=x;Uid=u;Pwd=SEKRET;Database=d"}, {"odbc": "Server=x;Uid=u;Pwd=•••;Database=d"},
                 id="an ODBC connection string"),
    pytest.param({"dsn": "host=db password='SEK RET\\'s' dbname=x", "dsn2": 'host=db password="SEKRET" user=x'},
                 {"dsn": "host=db password=••• dbname=x", "dsn2": "host=db password=••• user=x"},
                 id="quoted libpq passwords, with a space and an escaped quote"),
    pytest.param({"odbc": "Uid=u;Pwd={SEK;RET};Database=d", "odbc2": "Uid=u;Pwd={SE}}K;RET};Database=d",
                  "dsn": "password=SEK&RET"},
                 {"odbc": "Uid=u;Pwd=•••;Database=d", "odbc2": "Uid=u;Pwd=•••;Database=d", "dsn": "password=•••"},
                 id="braced ODBC passwords (}} for a brace) and one with an ampersand"),
    pytest.param({"dsn": "host=db api_key=SEKRET access_key=SEKRET"}, {"dsn": "host=db api_key=••• access_key=•••"},
                 id="keys in a connection string"),
    pytest.param({"check_without_cookie": True}, {"check_without_cookie": True}, id="a built-in flag named cookie"),
    pytest.param({"expose_headers": ["X-Auth", "X-Request-ID"], "pair": ["X-Api-Key", "SEKRET"],
                  "headers": ["Authorization", "Bearer SEKRET"], "add_headers": ["X-Api-Key", "SEKRET"]},
                 {"expose_headers": ["X-Auth", "X-Request-ID"], "pair": ["X-Api-Key", "•••"],
                  "headers": ["Authorization", "•••"], "add_headers": ["X-Api-Key", "•••"]},
                 id="a list of header names is no (name, value) pair; a pair of a layer of your own is"),
    pytest.param({"smtp_pass": "SEKRET", "pwd": "SEKRET", "passphrase": "SEKRET", "bearer": "SEKRET",
                  "cookie": "sid=SEKRET", "basic_auth": "u:SEKRET"},
                 {"smtp_pass": "•••", "pwd": "•••", "passphrase": "•••", "bearer": "•••", "cookie": "•••",
                  "basic_auth": "•••"}, id="names of secrets beyond password and key"),
    pytest.param({"headers": {"X-Auth": "SEKRET", "Cookie": "sid=SEKRET", "Accept": "text/html"}},
                 {"headers": {"X-Auth": "•••", "Cookie": "•••", "Accept": "text/html"}}, id="headers as a mapping"),
    pytest.param({"signing_salt": "SEKRET", "hmac": "SEKRET", "passcode": "SEKRET", "otp_seed": "SEKRET",
                  "cred": "SEKRET", "sig": "SEKRET", "pin": "1234", "private_pem": "SEKRET"},
                 {"signing_salt": "•••", "hmac": "•••", "passcode": "•••", "otp_seed": "•••", "cred": "•••",
                  "sig": "•••", "pin": "•••", "private_pem": "•••"}, id="salts, MACs, one-time codes, PINs"),
    pytest.param({"material": "-----BEGIN PRIVATE KEY-----\nMIISEKRET\n-----END PRIVATE KEY-----\n",
                  "legacy": ["-----BEGIN EC PRIVATE KEY-----MIISEKRET"]},
                 {"material": "•••", "legacy": ["•••"]}, id="a PEM private key under any name"),
    pytest.param({"auth": "required", "author": "ann", "cookie_name": "sid", "bypass": "yes", "passage": "x",
                  "pinned": "v2", "design": "x", "otpauth_label": "x"},
                 {"auth": "required", "author": "ann", "cookie_name": "sid", "bypass": "yes", "passage": "x",
                  "pinned": "v2", "design": "x", "otpauth_label": "x"},
                 id="names that only look like them are shown"),
])
def test_the_operator_page_masks_a_factory_layers_options(options: dict[str, object],
                                                        shown: dict[str, object]) -> None:
    assert mask(options) == shown


def test_options_objects_do_not_show_secrets_in_their_repr() -> None:
    from app.options import AppOptions
    from middleware.auth import AuthMiddleware

    auth = AuthMiddleware.Options(secret="SEKRET" * 8)
    search = AppOptions(var_dir="var", search={"engine": "searxng", "upstream": "https://u:SEKRET@searx.example"})
    assert "SEKRET" not in repr(auth) and "SEKRET" not in repr(search)


@pytest.mark.parametrize(("layer", "options", "said"), [
    pytest.param("middleware.auth:AuthMiddleware", {"secret": "SEKRET-too-short"},
                 "secret must be at least 32 bytes for HS256 (it has 16)", id="auth"),
    pytest.param("middleware.session:SessionMiddleware", {"secret_key": "SEKRET-too-short"},
                 "secret_key must be at least 32 characters long (it has 16)", id="session"),
    pytest.param("middleware.csrf:CSRFMiddleware", {"double_submit": True, "secret_key": "SEKRET"},
                 "double_submit needs a secret_key of at least 32 characters", id="csrf"),
])
def test_options_refused_from_python_do_not_show_the_secret(layer: str, options: dict[str, object],
                                                            said: str) -> None:
    """A layer's options built in Python (not from stack.yaml): pydantic's error text would print the input."""
    from pydantic import ValidationError

    from config.registry import import_string

    with pytest.raises(ValidationError) as info:
        import_string(layer).Options(**options)
    assert said in str(info.value)
    assert "SEKRET" not in str(info.value)
