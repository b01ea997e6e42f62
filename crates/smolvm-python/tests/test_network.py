"""Networking from Python: the three modes, addresses, port forwards in every mode, and
egress settings checked by the runtime. (The test suite runs in a private network
namespace; nat VMs there have no way out.)"""

import ipaddress

import pytest

from conftest import SMALL, http_get, require_private_netns, wait_for
from smolvm import SmolVM, VMConfig, _native
from smolvm.exceptions import NetworkError, ValidationError


@pytest.fixture(autouse=True)
def _private_network_namespace():
    """These tests make TAPs and nft rules: they fail (not pass) outside a private netns."""
    require_private_netns()


@pytest.mark.parametrize("network", ["none", "user", "nat"])
def test_expose_local_and_address_in_every_mode(network):
    with SmolVM(network=network, **SMALL) as vm:
        ip = vm.get_ip()
        if network == "none":
            assert ip is None
        elif network == "user":
            assert ip == "10.0.2.15"
        else:
            assert ipaddress.ip_address(ip) in ipaddress.ip_network("172.16.0.0/16")
            assert vm.run("ip -4 -o addr show eth0").output.split()[3] == f"{ip}/32"
        assert vm.config.network == network
        vm.write_file("/srv/n/index.html", f"served in {network} mode\n")
        vm.run("cd /srv/n && nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &")
        port = vm.expose_local(8000)
        assert http_get(f"http://127.0.0.1:{port}/") == f"served in {network} mode\n"


def test_default_network_is_resolved_and_recorded():
    vm = SmolVM(**SMALL)
    try:
        # Root with /dev/net/tun and nft (as here): nat, as the seeds; otherwise user.
        assert vm.config.network in ("nat", "user")
    finally:
        vm.delete()


def test_two_nat_vms_get_distinct_addresses_and_cannot_reach_each_other():
    a = SmolVM(network="nat", **SMALL).start()
    b = SmolVM(network="nat", **SMALL).start()
    try:
        assert a.get_ip() != b.get_ip()
        b.run("nohup python3 -m http.server 8080 >/dev/null 2>&1 &")
        probe = "python3 -c \"import socket; socket.create_connection(('{}', 8080), 2)\""
        assert wait_for(lambda: b.run(probe.format("127.0.0.1")).ok, timeout=20)
        r = a.run(probe.format(b.get_ip()), timeout=20)
        assert not r.ok, "VM-to-VM traffic must be dropped"
    finally:
        a.delete()
        b.delete()


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(egress="maybe"), "egress"),
        (dict(allow_egress=["300.1.2.3/8"]), "allow_egress"),
        (dict(deny_egress=["10.0.0.0/8:99999"]), "deny_egress"),
        (dict(allow_egress="203.0.113.0/24"), "allow_egress"),
        (dict(network="bridge"), "network"),
        (dict(network="user", allow_egress=["203.0.113.0/24"]), "allow_egress"),
    ],
)
def test_bad_network_settings_name_the_field(fields, field):
    with pytest.raises(ValidationError) as e:
        VMConfig(**fields)
    assert e.value.field == field, str(e.value)


def test_egress_settings_round_trip():
    c = VMConfig(network="nat", egress="deny", allow_egress=["203.0.113.0/24", "198.51.100.7:443"])
    assert (c.egress, c.allow_egress, c.deny_egress) == ("deny", ["203.0.113.0/24", "198.51.100.7:443"], [])


@pytest.mark.parametrize(
    "fields, says",
    [
        (dict(network="nat"), "nat networking is not available here"),
        (dict(network="auto", allow_egress=["203.0.113.0/24"]), "egress lists need nat networking"),
    ],
)
def test_nat_unavailable_raises_network_error(monkeypatch, tmp_path, fields, says):
    # With no `nft` on PATH (an empty directory), nat networking is unavailable to anyone,
    # root or not: the runtime's network error reaches Python as NetworkError, the class of
    # its kind (it arrived as plain SmolVMError before), and nothing is created.
    monkeypatch.setenv("PATH", str(tmp_path))
    before = {v for v in _native.list_vms()}
    with pytest.raises(NetworkError) as e:
        SmolVM(**fields, **SMALL)
    assert says in str(e.value)
    assert not isinstance(e.value, ValidationError)
    assert {v for v in _native.list_vms()} == before
