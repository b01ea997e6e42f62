"""The seeds' examples that build an SSH-capable image: the persistent agent workspace,
the browser agent and OpenClaw. Package installs and outside sites need the internet, so
those steps are replaced by local work; everything else runs as written."""

import os

import pytest

from conftest import SMALL, http_get
from smolvm import SmolVM, VMConfig, VMState, SSH_BOOT_ARGS
from smolvm.build import ImageBuilder, SSH_BOOT_ARGS as BUILD_SSH_BOOT_ARGS
from smolvm.exceptions import ImageError, NetworkError
from smolvm.utils import ensure_ssh_key


@pytest.fixture(scope="module")
def ssh_image():
    private_key, public_key = ensure_ssh_key()
    builder = ImageBuilder()
    kernel, rootfs = builder.build_debian_ssh_key(
        ssh_public_key=public_key,
        rootfs_size_mb=2048,
    )
    return dict(
        private_key=private_key,
        public_key=public_key,
        kernel=kernel,
        rootfs=rootfs,
        known_hosts=builder.known_hosts,
        alias=builder.host_key_alias,
    )


def test_ensure_ssh_key_is_stable():
    a = ensure_ssh_key()
    b = ensure_ssh_key()
    assert a == b and all(os.path.isfile(p) for p in a)
    assert oct(os.stat(a[0]).st_mode & 0o777) == oct(0o600)
    assert open(a[1]).read().startswith("ssh-ed25519 ")
    assert SSH_BOOT_ARGS == BUILD_SSH_BOOT_ARGS


def test_bad_ssh_key_and_missing_base_are_refused():
    with pytest.raises(ImageError):
        ImageBuilder().build_debian_ssh_key(ssh_public_key="not a key", name="bad-key")
    with pytest.raises(ImageError):
        ImageBuilder().build_debian_ssh_key(
            ssh_public_key=ensure_ssh_key()[1], name="x", base_image="no-such-base"
        )


def test_persistent_agent_workspace(ssh_image):
    # 1. Create a persistent VM
    config = VMConfig(
        vm_id="agent-workspace",  # Stable ID for reconnection
        vcpu_count=2,
        mem_size_mib=2048,
        kernel_path=ssh_image["kernel"],
        rootfs_path=ssh_image["rootfs"],
        boot_args=SSH_BOOT_ARGS,
    )
    vm = SmolVM(config)
    vm.start()
    # Install dependencies once (offline: check what the image has instead)
    assert vm.run("python3 -c 'import sqlite3, json; print(\"deps ok\")'").output == "deps ok"
    print(f"Agent workspace ready: {vm.vm_id}")
    vm.close()  # Release resources, keep VM running

    # 2. Reconnect for each agent task
    def execute_agent_task(task: str) -> str:
        """Execute an agent task in the persistent workspace."""
        vm = SmolVM.from_id("agent-workspace")

        # Ensure VM is running
        if vm.status != VMState.RUNNING:
            vm.start()

        # Execute the task
        result = vm.run(task, timeout=120)
        vm.close()

        return result.stdout if result.ok else result.stderr

    # Use across multiple turns (a local repository instead of a clone)
    execute_agent_task("mkdir -p repo && cd repo && printf 'print(6*7)\\n' > analyze.py")
    assert execute_agent_task("cd repo && python3 analyze.py") == "42\n"
    assert "No such file" in execute_agent_task("cd repo && python3 generate_report.py")
    # The workspace survives a stop: the next task starts it again.
    SmolVM.from_id("agent-workspace").stop()
    assert execute_agent_task("cat repo/analyze.py") == "print(6*7)\n"

    # 3. Clean up when done
    vm = SmolVM.from_id("agent-workspace")
    vm.stop()
    vm.delete()
    print("Workspace deleted")


def test_ssh_server_with_pinned_host_key(ssh_image):
    """The image's SSH server accepts the key, and a client that pins the image's host key
    connects without trusting on first use (ssh from inside the guest, over loopback)."""
    with SmolVM(
        kernel_path=ssh_image["kernel"],
        rootfs_path=ssh_image["rootfs"],
        boot_args=SSH_BOOT_ARGS,
        ssh_key_path=ssh_image["private_key"],
        **SMALL,
    ) as vm:
        assert vm.ssh_key_path == ssh_image["private_key"]
        vm.upload(ssh_image["private_key"], "/tmp/id")
        vm.upload(ssh_image["known_hosts"], "/tmp/known_hosts")
        ssh = (
            "ssh -i /tmp/id -o BatchMode=yes -o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile=/tmp/known_hosts -o HostKeyAlias={ssh_image['alias']} "
            "root@127.0.0.1 echo ssh-ok"
        )
        for _ in range(50):  # sshd starts beside the agent; give it a moment
            r = vm.run(ssh, timeout=20)
            if r.ok or "refused" not in r.stderr:
                break
            vm.run("sleep 0.2")
        assert r.output == "ssh-ok", r.stderr
        # A wrong pinned key is refused: the pin is real.
        vm.run("ssh-keygen -q -t ed25519 -N '' -f /tmp/other && "
               f"echo \"{ssh_image['alias']} $(cut -d' ' -f1,2 /tmp/other.pub)\" > /tmp/wrong_hosts")
        bad = vm.run(ssh.replace("/tmp/known_hosts", "/tmp/wrong_hosts"), timeout=20)
        assert not bad.ok and "HOST IDENTIFICATION HAS CHANGED" in bad.stderr


def test_browser_agent_vm_shape(ssh_image):
    """create_browser_vm() as written, minus the package installs (internet); the browse
    step fetches a page served inside the guest instead of example.com."""

    def create_browser_vm() -> SmolVM:
        private_key, public_key = ensure_ssh_key()
        builder = ImageBuilder()
        kernel, rootfs = builder.build_debian_ssh_key(
            ssh_public_key=public_key,
            rootfs_size_mb=2048,
        )
        config = VMConfig(
            vm_id="browser-agent",
            vcpu_count=2,
            mem_size_mib=2048,
            kernel_path=kernel,
            rootfs_path=rootfs,
            boot_args=SSH_BOOT_ARGS,
        )
        vm = SmolVM(config, ssh_key_path=str(private_key))
        vm.start()
        return vm

    def browse_url(vm: SmolVM, url: str) -> str:
        script = f'''
import urllib.request
print(urllib.request.urlopen("{url}", timeout=10).read().decode())
'''
        vm.run(f"cat > /tmp/browse.py << 'EOF'\n{script}\nEOF")
        result = vm.run("python3 /tmp/browse.py", timeout=60)
        return result.stdout if result.ok else f"Error: {result.stderr}"

    with create_browser_vm() as vm:
        vm.run("mkdir -p /srv && echo '<h1>hello agent</h1>' > /srv/index.html")
        vm.run("cd /srv && nohup python3 -m http.server 8080 --bind 127.0.0.1 >/tmp/http.log 2>&1 &")
        html = ""
        for _ in range(50):
            html = browse_url(vm, "http://127.0.0.1:8080/")
            if "hello agent" in html:
                break
        assert "<h1>hello agent</h1>" in html


def test_openclaw_example(ssh_image, monkeypatch):
    """examples/openclaw.py from the seeds: API keys from the host environment, a 4 GB SSH
    image, a gateway started with nohup and its dashboard exposed on the host. Node.js and
    OpenClaw come from the internet, so a Python HTTP server plays the gateway."""
    from smolvm import SmolVM, VMConfig, SSH_BOOT_ARGS
    from smolvm.build import ImageBuilder
    from smolvm.utils import ensure_ssh_key

    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test")
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    GUEST_DASHBOARD_PORT = 18789
    HOST_DASHBOARD_PORT = 18789

    # Collect API keys from host environment
    env_vars = {}
    if api_key := os.getenv("OPENROUTER_API_KEY"):
        env_vars["OPENROUTER_API_KEY"] = api_key
    if api_key := os.getenv("OPENAI_API_KEY"):
        env_vars["OPENAI_API_KEY"] = api_key

    # Build 4GB Debian image for OpenClaw
    private_key, public_key = ensure_ssh_key()
    builder = ImageBuilder()
    kernel, rootfs = builder.build_debian_ssh_key(
        ssh_public_key=public_key,
        name="debian-ssh-key-openclaw-4g",
        rootfs_size_mb=4096,
    )

    config = VMConfig(
        vcpu_count=1,
        mem_size_mib=2048,
        kernel_path=kernel,
        rootfs_path=rootfs,
        boot_args=SSH_BOOT_ARGS,
        env_vars=env_vars,  # Inject API keys
    )

    with SmolVM(config, ssh_key_path=str(private_key)) as vm:
        print(f"VM running: {vm.vm_id} ({vm.get_ip()})")
        assert vm.run("df -m / | tail -1 | awk '{print $2}'").output.isdigit()
        assert int(vm.run("df -m / | tail -1 | awk '{print $2}'").output) > 3500

        # The gateway (installing Node.js and OpenClaw needs the internet).
        vm.run("mkdir -p /srv/dash && echo \"token ok: ${OPENAI_API_KEY:+yes}\" > /srv/dash/index.html")
        vm.run(
            f"cd /srv/dash && nohup python3 -m http.server {GUEST_DASHBOARD_PORT} "
            f">/tmp/openclaw-gateway.log 2>&1 &",
            timeout=30,
        )
        # Expose dashboard to host (a free port if 18789 is taken on this host).
        try:
            host_port = vm.expose_local(
                guest_port=GUEST_DASHBOARD_PORT,
                host_port=HOST_DASHBOARD_PORT,
            )
        except NetworkError:
            host_port = vm.expose_local(guest_port=GUEST_DASHBOARD_PORT)

        print(f"Dashboard ready: http://127.0.0.1:{host_port}/")
        body = http_get(f"http://127.0.0.1:{host_port}/")
        assert body.strip() == "token ok: yes"
        assert vm.list_forwards() == [
            {"host_addr": "127.0.0.1", "host_port": host_port, "guest_port": GUEST_DASHBOARD_PORT}
        ]
        # (The seed waits for Enter here.)
    # The forward went with the VM.
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", host_port), timeout=2).close()
