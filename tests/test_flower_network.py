"""A federation across machines, as docs/flower.md sets it up: a SuperLink with TLS and SuperNode authentication,
and one `fedmeta node` per user on another host, reached over a network link, not loopback.

The users' host is a Linux network namespace joined to this one by a virtual Ethernet pair: its own interfaces,
addresses and loopback, so its processes reach the SuperLink only at the address on that link, as a user
machine would. Creating one needs root (CAP_NET_ADMIN) and iproute2; elsewhere the test is skipped.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_flower import alarm, init, local_twin

from fedmeta import config, runtime
from fedmeta.engine import processes
from fedmeta.engine.deployment import flower_env
from fedmeta.experiment import Experiment

from conftest import cli_env, load_tiny, tiny_raw

NODE_START_S = 120  # a node imports torch and loads its data before its SuperNode starts


@dataclass
class Link:
    """The users' host: a network namespace, and the addresses of both ends of its link."""

    netns: str
    server: str  # this host's end: where the SuperLink listens
    user: str


def _can_make_netns() -> str | None:
    """Why no namespace can be made here, or None."""
    if sys.platform != "linux" or shutil.which("ip") is None:
        return "needs Linux and iproute2's `ip`"
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    return None


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    why = _can_make_netns()
    if why is not None:
        pytest.skip(why)
    tag = str(os.getpid() % 100000)
    netns, here, there = f"fedmeta-{tag}", f"fmh{tag}", f"fmu{tag}"
    octet = 16 + os.getpid() % 200
    server, user = f"10.231.{octet}.1", f"10.231.{octet}.2"
    try:
        sh("ip", "netns", "add", netns)
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot create a network namespace: {err.stderr.decode().strip()}")
    try:
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        sh("ip", "link", "set", there, "netns", netns)
        sh("ip", "addr", "add", f"{server}/24", "dev", here)
        sh("ip", "-n", netns, "addr", "add", f"{user}/24", "dev", there)
        sh("ip", "link", "set", here, "up")
        sh("ip", "-n", netns, "link", "set", there, "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        yield Link(netns, server, user)
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)  # deletes both ends
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def credentials(folder: Path, server_ip: str, users: int) -> None:
    """A CA, the SuperLink's certificate for `server_ip` signed by it, and one ECDSA key pair per user (plus an
    unregistered one), in the formats Flower reads: PEM for TLS, OpenSSH for SuperNode keys."""
    now = datetime.datetime.now(datetime.UTC)
    pem, openssh = serialization.Encoding.PEM, serialization.Encoding.OpenSSH

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer, ca: bool):  # type: ignore[no-untyped-def]
        build = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if ca:
            build = build.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        else:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(server_ip))])
            build = build.add_extension(san, critical=False)
        return build.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmeta test CA")])
    ca = certificate("fedmeta test CA", ca_key, ca_name, ca_key, ca=True)
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(certificate("superlink", key, ca_name, ca_key, ca=False).public_bytes(pem))
    plain = serialization.NoEncryption()
    (folder / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    for name in [*(f"user{u}" for u in range(users)), "stranger"]:
        node_key = ec.generate_private_key(ec.SECP384R1())
        (folder / name).write_bytes(node_key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, plain))
        public = node_key.public_key().public_bytes(openssh, serialization.PublicFormat.OpenSSH)
        (folder / f"{name}.pub").write_bytes(public)


def node(link: Link, project: Path, user: int, key: Path, log: Path) -> subprocess.Popen[bytes]:
    """`fedmeta node USER --auth-key KEY` on the users' host, from the project's checkout."""
    argv = ["ip", "netns", "exec", link.netns, sys.executable, "-m", "fedmeta", "node", str(user)]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*argv, "--auth-key", str(key)],
            cwd=project,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], limit: float) -> None:
    deadline = time.monotonic() + limit
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"the node exited with {proc.returncode}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {limit} s: {log.read_text()[-2000:]}"
        time.sleep(0.2)


def serverapps(server: processes.Supervisor) -> list[int]:
    """The `flwr-serverapp` processes under the SuperLink: a stage's ServerApp must end with the stage, since
    this SuperLink, unlike a stage's own, outlives it."""
    found = []
    for pid in processes.pid_tree(server.procs["superlink"].pid):
        try:
            if any("flwr-serverapp" in part for part in psutil.Process(pid).cmdline()):
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_federation_across_hosts_with_tls_and_authenticated_supernodes(
    link: Link, tmp_path: Path, omniglot_dir: Path
) -> None:
    creds, home = tmp_path / "creds", tmp_path / "home"
    creds.mkdir()
    home.mkdir()
    raw = tiny_raw(omniglot_dir)
    users = raw["federation"]["users"]
    credentials(creds, link.server, users)
    port = 9300
    raw["federation"] |= {
        "engine": "flower",
        "flower": {
            "superlink": f"{link.server}:{port}",
            "root_certificates": str(creds / "ca.crt"),
            "round_timeout": 120.0,
        },
    }
    params = config.parse(raw)
    data = load_tiny(params)
    project = tmp_path / "user-checkout"  # what each user machine has: params.yaml and the prepared dataset
    (project / runtime.PREPARED).parent.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    data.save(project / runtime.PREPARED)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedmeta"\n\n[superlink.fedmeta]\naddress = "{link.server}:{port}"\n'
        f'root-certificates = "{creds / "ca.crt"}"\n'
    )
    env = flower_env(home)
    server = processes.Supervisor(tmp_path / "server-logs", env)
    nodes: list[subprocess.Popen[bytes]] = []
    exp = Experiment(params, data, torch.device("cpu"))
    runtime.configure(params)
    with alarm(300):
        try:
            server.start(
                "superlink",
                [
                    "flower-superlink",
                    *("--ssl-ca-certfile", str(creds / "ca.crt"), "--ssl-certfile", str(creds / "server.pem")),
                    *("--ssl-keyfile", str(creds / "server.key"), "--enable-supernode-auth"),
                    *("--host", link.server, "--port", str(port), "--disable-runtime-dependency-installation"),
                ],
            )
            server.wait_listening("superlink", port, 60, host=link.server)
            for u in range(users):  # the server's operator registers each user's public key
                subprocess.run(
                    ["flwr", "supernode", "register", str(creds / f"user{u}.pub"), "fedmeta"],
                    env=env,
                    check=True,
                    capture_output=True,
                )
            logs = [tmp_path / f"node{u}.log" for u in range(users)]
            nodes = [node(link, project, u, creds / f"user{u}", logs[u]) for u in range(users)]
            stranger_log = tmp_path / "stranger.log"
            stranger = node(link, project, 0, creds / "stranger", stranger_log)
            for u in range(users):
                wait_for_line(logs[u], "started", nodes[u], NODE_START_S)

            twin = Experiment(local_twin(params), data, torch.device("cpu"))
            theta, local, took = init(exp), init(twin), []
            for rnd in range(2):
                start = time.perf_counter()
                theta = exp.round(theta, rnd, False, pretraining=True)
                took.append(time.perf_counter() - start)
                local = twin.round(local, rnd, False, pretraining=True)
                assert all(torch.equal(theta[k], local[k]) for k in local), f"round {rnd}: θ differs from local"
            print("seconds per round across hosts:", took)
            assert serverapps(server), "no ServerApp runs the stage's rounds on the SuperLink"

            assert stranger.wait(timeout=NODE_START_S) == 2, "a SuperNode with an unregistered key was let in"
            refusal = stranger_log.read_text().strip().splitlines()[-1]
            assert refusal.startswith("error: user 0: supernode0 exited with code"), refusal
            assert "Failed to activate SuperNode" in refusal, refusal
        finally:
            flower_pids = exp.flower.pids() if exp.flower is not None else []
            if exp.flower is not None:
                exp.flower.close()
            deadline = time.monotonic() + 30
            while serverapps(server) and time.monotonic() < deadline:
                time.sleep(0.5)
            serverapp_left = serverapps(server)
            node_pids = [pid for p in nodes for pid in processes.pid_tree(p.pid)]
            for p in nodes:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            codes = [p.wait(timeout=60) for p in nodes]
            server_pids = [pid for p in server.procs.values() for pid in processes.pid_tree(p.pid)]
            server.stop_all()
    assert serverapp_left == [], "the stage's ServerApp outlived its federation on the SuperLink"
    assert codes == [0] * users, "a node did not stop cleanly on SIGTERM"
    assert all("stopped" in log.read_text() for log in logs)
    assert processes.pids_alive(flower_pids + node_pids + server_pids) == [], "a process outlived the federation"
