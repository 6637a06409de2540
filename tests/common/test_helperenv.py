"""
The node → helper contract (docs/protocols.md section 9): what the node
writes with ``toEnvironment`` is what a helper reads with
``fromEnvironment``, for every variable, and a runtime adds the addresses it
chooses by attribute name, never by a variable name of its own.
"""

from __future__ import annotations

from dataclasses import fields

import pytest

from dit4c.common.helperenv import VARIABLES, HelperEnvironment, fromEnvironment, toEnvironment

FULL = HelperEnvironment(
    instance="abc1",
    keyFile="/pods/abc1/instance.key",
    portal="https://portal.example",
    portalInternal="unix:/run/dit4c/portal.sock",
    tool="tcp:host=127.0.0.1:port=8888",
    authListen="unix:address=/pods/abc1/auth.sock:mode=600:lockfile=0",
    auth="unix:path=/pods/abc1/auth.sock",
    routing=("tcp:host=10.0.0.1:port=8001", "tls:routing.example:8443"),
    routingAudience="dit4c-routing-2",
    stateDir="/pods/abc1/state",
    onion="tcp:host=127.0.0.1:port=9051",
    imageServer="http://images.example:8600",
    imageFile="/pods/abc1/saved-image.tar",
    imageDigest="sha256:" + "0" * 64,
    fileServer="files.example:2222",
    fileServerHostKey="ssh-ed25519 AAAA",
    storageMount="/pods/abc1/mnt",
)


def test_every_attribute_has_its_variable() -> None:
    assert set(VARIABLES) == {f.name for f in fields(HelperEnvironment)}
    assert all(name.startswith("DIT4C_") for name in VARIABLES.values())


def test_what_the_node_writes_the_helper_reads_back() -> None:
    environment = toEnvironment(FULL)
    assert set(environment) == set(VARIABLES.values())
    assert environment["DIT4C_ROUTING"] == "tcp:host=10.0.0.1:port=8001 tls:routing.example:8443"
    assert fromEnvironment(environment) == FULL


def test_unset_values_are_left_out() -> None:
    minimal = HelperEnvironment(instance="abc1", keyFile="/k", portal="https://portal.example")
    assert toEnvironment(minimal) == {
        "DIT4C_INSTANCE": "abc1",
        "DIT4C_INSTANCE_KEY": "/k",
        "DIT4C_PORTAL": "https://portal.example",
        "DIT4C_ROUTING_AUDIENCE": "dit4c-routing",
    }
    assert fromEnvironment(toEnvironment(minimal)) == minimal


def test_a_runtime_adds_what_it_chose_by_attribute() -> None:
    pod = toEnvironment(HelperEnvironment(instance="abc1", keyFile="/k", portal="https://portal.example"))
    chosen = toEnvironment(tool="tcp:host=127.0.0.1:port=9", auth="unix:path=/a.sock", storageMount=None)
    assert chosen == {"DIT4C_TOOL": "tcp:host=127.0.0.1:port=9", "DIT4C_AUTH": "unix:path=/a.sock"}
    helper = fromEnvironment({**pod, **chosen})
    assert (helper.tool, helper.auth, helper.storageMount) == ("tcp:host=127.0.0.1:port=9", "unix:path=/a.sock", None)
    # Given over a whole environment, the chosen values win.
    assert toEnvironment(FULL, tool="unix:path=/t.sock")["DIT4C_TOOL"] == "unix:path=/t.sock"


def test_a_name_that_is_not_an_attribute_is_refused() -> None:
    with pytest.raises(TypeError, match="toolPort"):
        toEnvironment(toolPort="8888")
