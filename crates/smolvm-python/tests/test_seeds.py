"""Every example of the seed documents, as written; adapted only where it needs the
internet (package installs, git clones, a model API) or waits for a person."""

import concurrent.futures
import os
import subprocess

import pytest

from conftest import SMALL, processes_of, STATE
from smolvm import SmolVM, VMConfig, VMState, VM
from smolvm.exceptions import (
    CommandExecutionUnavailableError,
    OperationTimeoutError,
    SmolVMError,
)


def test_vm_lifecycle():
    # 1. Create VM instance
    vm = SmolVM()
    # 2. Start the VM (configures networking, boots kernel)
    vm.start()
    # 3. Execute commands
    result = vm.run("echo 'Hello from SmolVM'")
    print(result.output)
    assert result.output == "Hello from SmolVM"
    # 4. Stop and cleanup
    vm.stop()
    assert vm.status == VMState.STOPPED
    vm.delete()


def test_context_manager_free_m():
    with SmolVM(mem_size_mib=2048) as vm:
        result = vm.run("free -m")
        print(result.output)
        vm_id = vm.vm_id
        total = int(result.output.splitlines()[1].split()[1])
        assert 1800 < total <= 2048, result.output
    # VM automatically stopped and cleaned up
    with pytest.raises(SmolVMError):
        SmolVM.from_id(vm_id)


def test_resources_and_reconnect():
    vm = SmolVM(vcpu_count=4, mem_size_mib=2048)
    try:
        vm.start()
        assert vm.run("nproc").output == "4"
        # Reconnect to an existing VM
        again = SmolVM.from_id(vm.vm_id)
        print(f"Status: {again.status}")
        assert again.status == VMState.RUNNING
        assert again.run("hostname").output == vm.vm_id
    finally:
        vm.delete()


def test_disk_modes_and_resource_config():
    config = VMConfig(vcpu_count=2, mem_size_mib=512)  # Max 2 CPUs, max 512 MiB RAM
    assert (config.vcpu_count, config.mem_size_mib) == (2, 512)
    assert VMConfig(disk_mode="isolated").disk_mode == "isolated"
    assert VMConfig(disk_mode="shared").disk_mode == "shared"
    config = VMConfig(disk_mode="isolated", retain_disk_on_delete=True)
    vm = SmolVM(config, **SMALL)
    vm.start()
    vm.run("echo kept > ~/state.txt && sync")
    kept = vm.delete()
    try:
        assert kept and os.path.exists(kept)
        again = SmolVM(disk_path=kept, **SMALL)
        with again:
            assert again.run("cat ~/state.txt").output == "kept"
    finally:
        os.remove(kept)
        note = os.path.splitext(kept)[0] + ".json"
        if os.path.exists(note):
            os.remove(note)


def execute_code_in_sandbox_facade(code: str) -> str:
    """Tool for the agent to run shell code safely."""
    from smolvm import VM

    with VM() as vm:
        result = vm.run(code)
        return result.stdout if result.exit_code == 0 else result.stderr


def test_tool_function_facade():
    assert execute_code_in_sandbox_facade("echo $((6*7))") == "42\n"
    assert "nope" in execute_code_in_sandbox_facade("echo nope >&2; exit 1")


def execute_code_in_sandbox(code: str, language: str = "python") -> str:
    """Tool for AI agent to execute code safely (the seeds' function, verbatim)."""
    with SmolVM() as vm:
        if language == "python":
            # Write code to a file and execute
            vm.run(f"cat > /tmp/script.py << 'EOF'\n{code}\nEOF")
            result = vm.run("python3 /tmp/script.py", timeout=30)
        elif language == "bash":
            result = vm.run(code, timeout=30)
        else:
            return f"Unsupported language: {language}"

        if result.ok:
            return result.stdout
        else:
            return f"Error (exit {result.exit_code}): {result.stderr}"


def test_tool_calling_python_and_bash():
    # What a model would send for "Calculate fibonacci(10)" (no model is called).
    fib = (
        "def fib(n):\n"
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "    return a\n"
        "print(f\"fibonacci(10) = {fib(10)}\")"
    )
    assert execute_code_in_sandbox(fib, "python") == "fibonacci(10) = 55\n"
    assert execute_code_in_sandbox("echo $((2**10)); ls / | grep -c etc", "bash") == "1024\n1\n"
    out = execute_code_in_sandbox("raise SystemExit('boom')", "python")
    assert out.startswith("Error (exit 1)") and "boom" in out
    assert execute_code_in_sandbox("x", "cobol") == "Unsupported language: cobol"


def test_long_running_agent_environment():
    # Create VM with specific ID
    vm = VM(vm_id="agent-workspace")
    vm.start()
    try:
        # Perform actions across multiple agent turns (pip install needs the internet:
        # the turn writes and runs a script instead).
        vm.run("mkdir -p /work && echo 'print(sum(range(10)))' > /work/analyze_data.py")
        assert vm.run("cd /work && python3 analyze_data.py").output == "45"
        # Reconnect later
        vm = VM.from_id("agent-workspace")
        assert vm.run("cat /work/analyze_data.py").ok
        # VM(vm_id=...) of an existing VM reconnects too.
        assert VM(vm_id="agent-workspace").status == VMState.RUNNING
    finally:
        VM.from_id("agent-workspace").delete()


def safe_execute(code: str, timeout: int = 30) -> dict:
    """Execute code with comprehensive error handling (the seeds' function; the timeout is
    a parameter so the test does not wait 30 s)."""
    try:
        with SmolVM(**SMALL) as vm:
            result = vm.run(code, timeout=timeout)
            return {
                "success": result.ok,
                "output": result.stdout,
                "error": result.stderr if not result.ok else None,
                "exit_code": result.exit_code,
            }
    except OperationTimeoutError:
        return {
            "success": False,
            "error": f"Execution timed out after {timeout} seconds",
        }
    except CommandExecutionUnavailableError as e:
        return {
            "success": False,
            "error": f"Cannot execute commands: {e.reason}",
        }
    except SmolVMError as e:
        return {
            "success": False,
            "error": f"VM error: {str(e)}",
        }


def test_error_handling_for_agents():
    assert safe_execute("echo fine") == {"success": True, "output": "fine\n", "error": None, "exit_code": 0}
    bad = safe_execute("echo oops >&2; exit 2")
    assert bad["success"] is False and bad["exit_code"] == 2 and bad["error"] == "oops\n"
    assert safe_execute("sleep 60", timeout=2) == {
        "success": False,
        "error": "Execution timed out after 2 seconds",
    }


def test_error_handling_unavailable_and_vm_errors():
    vm = SmolVM(**SMALL)  # created, never started
    try:
        with pytest.raises(CommandExecutionUnavailableError) as e:
            vm.run("true")
        assert "created" in e.value.reason
    finally:
        vm.delete()
    with pytest.raises(SmolVMError) as e:
        SmolVM(image="no-such-image")
    assert "no-such-image" in str(e.value)


def create_agent_workspace(agent_id: str) -> str:
    """Create isolated workspace for one agent (git clone needs the internet: the task
    file is written instead)."""
    with SmolVM() as vm:
        # Each agent gets a fresh VM
        vm.run(f"mkdir -p /workspace/{agent_id}")
        vm.run(f"cd /workspace/{agent_id} && echo 'import os; print(os.getcwd())' > task.py")
        result = vm.run(f"cd /workspace/{agent_id} && python3 task.py")
        return result.output


def test_multi_tenant_thread_pool():
    # Run multiple agents in parallel: 10 sandboxes on 5 workers.
    outputs = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as executor:
        futures = [executor.submit(create_agent_workspace, f"agent-{i}") for i in range(10)]
        for future in concurrent.futures.as_completed(futures):
            output = future.result()
            print(output)
            outputs.append(output)
    assert sorted(outputs) == sorted(f"/workspace/agent-{i}" for i in range(10))


def test_best_practices_ephemeral_timeouts_and_secrets(monkeypatch):
    def execute_untrusted_code(code: str) -> str:
        with SmolVM(**SMALL) as vm:
            result = vm.run(code)
            return result.output

    assert execute_untrusted_code("echo clean") == "clean"

    monkeypatch.setenv("API_KEY", "sk-test-123")
    config = VMConfig(
        vm_id="agent-vm",
        vcpu_count=1,  # Single vCPU
        mem_size_mib=512,  # 512MB RAM
        env_vars={
            "API_KEY": os.getenv("API_KEY"),  # From host environment
        },
    )
    with SmolVM(config) as vm:
        # Always specify timeouts to prevent hanging
        result = vm.run("potentially-slow-command", timeout=30)
        if not result.ok:
            print(f"Command failed or timed out: {result.stderr}")
        assert result.exit_code == 127 and "not found" in result.stderr
        # The app reads API_KEY from its environment, not the command line.
        assert vm.run('test "$API_KEY" = sk-test-123').ok
    # The secret never reached smolvm's database (read by a child process: opening the
    # file here would drop this process's SQLite locks).
    db = os.path.join(STATE, "smolvm.db")
    dump = subprocess.run(["sh", "-c", f"cat {db} {db}-wal 2>/dev/null"], capture_output=True).stdout
    assert dump and b"sk-test-123" not in dump


def test_security_env_vars_page():
    with SmolVM(**SMALL) as vm:
        vm.set_env_vars({"API_KEY": "sk-...", "DEBUG": "1"})
        assert vm.run("echo $DEBUG").output == "1"
        profile = vm.run("cat /etc/profile.d/smolvm_env.sh; stat -c %a /etc/profile.d/smolvm_env.sh")
        assert "API_KEY" in profile.stdout and profile.stdout.strip().endswith("600")
        assert vm.run("sh -lc 'echo $API_KEY'").output == "sk-..."
