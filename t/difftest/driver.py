#!/usr/bin/env python3
"""Differential test: ./mandos against the reference server /usr/sbin/mandos.

    driver.py random N SEED      N generated configurations (gen.py)
    driver.py case DIR...        fixed inputs (DIR/clients.conf, DIR/mandos.conf)
    driver.py version            the protocol version line, fed to both
    driver.py list-ids           the ids of t/differences, one a line

Each server runs on its own private system bus (a dbus-daemon started here,
one per server for the whole run), with --no-zeroconf on [::1] and a free
port.  What is compared: whether each server accepts the files (it keeps
running, listens, and answers on the bus), the set of clients, and the
properties PROPS of each client, read with GetManagedObjects.  Every
disagreement is looked up in t/differences; one that no entry matches is
UNDOCUMENTED.  Every wait is bounded; every process started here is
stopped by its PID.

Environment: MANDOS_BIN (default ./mandos), REF_BIN (default
/usr/sbin/mandos), DIFFTEST_KEEP (a directory: the files of every
undocumented configuration are copied there).  Standard library only.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True      # no __pycache__ in the source tree
import gen  # noqa: E402

PROPS = ["Name", "Host", "Checker", "Timeout", "Interval", "ExtendedTimeout",
         "ApprovalDelay", "ApprovalDuration", "ApprovedByDefault", "Enabled",
         "KeyID", "Fingerprint", "ObjectPath"]
KEY_SETS = ["difftest%d" % i for i in range(6)]
BUS_NAME = "se.recompile.Mandos"


# ---------------------------------------------------------------- processes

def stop(proc, secs=10):
    """SIGTERM, wait (bounded), SIGKILL; return the exit status."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(secs)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(5)


def free_port():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listening(port):
    """Something listens on [::1]:PORT or [::]:PORT (read from the kernel's
    table: connecting would disturb the server under test)."""
    want = ":%04X" % port
    try:
        with open("/proc/net/tcp6") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        cols = row.split()
        if cols[1].endswith(want) and cols[3] == "0A":
            return True
    return False


class Bus:
    """A private "system" bus: dbus-daemon with its own socket and a policy
    that lets anyone own any name (the reference drops privileges first)."""

    CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mandos-difftest-bus.")
        os.chmod(self.dir, 0o755)
        sock = os.path.join(self.dir, "bus")
        with open(os.path.join(self.dir, "bus.conf"), "w") as f:
            f.write(self.CONF % sock)
        self.log = open(os.path.join(self.dir, "dbus.log"), "w")
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--config-file=" + os.path.join(self.dir, "bus.conf"),
             "--nofork", "--nopidfile"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("private dbus-daemon did not start")
            time.sleep(0.02)
        os.chmod(sock, 0o777)
        self.address = "unix:path=" + sock
        self.env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)

    def busctl(self, *args, timeout=5):
        """busctl on this bus; (exit status, stdout, stderr)."""
        try:
            p = subprocess.run(["busctl", "--system", "--json=short", "--timeout=%d" % timeout]
                               + list(args), env=self.env, capture_output=True,
                               timeout=timeout + 5, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return 124, "", "busctl timed out"
        return p.returncode, p.stdout.decode("utf-8", "replace"), \
            p.stderr.decode("utf-8", "replace").strip()

    def has_owner(self):
        rc, out, _ = self.busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                                 "org.freedesktop.DBus", "NameHasOwner", "s", BUS_NAME)
        return rc == 0 and json.loads(out)["data"] == [True]

    def managed_objects(self):
        """({path: {property: value}} of the client objects, None) or
        (None, error text)."""
        rc, out, err = self.busctl("call", BUS_NAME, "/", "org.freedesktop.DBus.ObjectManager",
                                   "GetManagedObjects", timeout=10)
        if rc != 0:
            return None, err or "busctl exit %d" % rc
        objs = {}
        for path, ifaces in json.loads(out)["data"][0].items():
            props = ifaces.get("se.recompile.Mandos.Client")
            if props is not None:
                objs[path] = {k: v["data"] for k, v in props.items()}
        return objs, None

    def close(self):
        stop(self.proc, 5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Run:
    """One server started on one configuration directory: what it did."""

    def __init__(self, binary, bus, confdir, workdir, side, during=None, cwd=None):
        self.side = side
        self.during = None
        self.statedir = os.path.join(workdir, "state-" + side)
        os.mkdir(self.statedir)
        os.chmod(self.statedir, 0o777)
        self.logpath = os.path.join(workdir, side + ".log")
        self.port = free_port()
        self.accepted = False
        self.status = None
        self.objects = None
        self.bus_error = None
        with open(self.logpath, "wb") as log:
            # cwd = the configuration directory: both servers then read a
            # relative secfile from there (the reference uses its cwd)
            proc = subprocess.Popen(
                [binary, "--foreground", "--debug", "--no-zeroconf", "--configdir", confdir,
                 "--statedir", self.statedir, "--address", "::1", "--port", str(self.port)],
                cwd=cwd or confdir, env=bus.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        try:
            self.watch(proc, bus)
            if self.accepted and during is not None:
                # DURING(port) runs while the server serves; its result is kept
                self.during = during(self.port)
        finally:
            self.status = stop(proc) if self.status is None else self.status
        with open(self.logpath, "rb") as f:
            self.log = f.read().decode("utf-8", "replace")

    def watch(self, proc, bus):
        """Wait (bounded) until PROC exits or listens and owns its bus name
        (or listens for 8 s without it: D-Bus off), then read the objects."""
        deadline = time.monotonic() + 30
        listen_since = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.status = proc.returncode
                return
            if listen_since is None and listening(self.port):
                listen_since = time.monotonic()
            if listen_since is not None:
                if bus.has_owner():
                    self.objects, self.bus_error = bus.managed_objects()
                    break
                if time.monotonic() - listen_since > 8:
                    self.bus_error = "no bus name"
                    break
            time.sleep(0.05)
        else:
            self.bus_error = "no answer within 30 s"
            return
        # a server that crashes right after answering did not accept the files
        time.sleep(0.2)
        if proc.poll() is not None:
            self.status = proc.returncode
            return
        self.accepted = listening(self.port)

    def verdict(self):
        return "accept" if self.accepted else "refuse"

    # the reference's noise: no syslog socket here, and a destructor that
    # fails after a crash
    NOISE = re.compile(r"No such file or directory$|Bad file descriptor$|_locations_lock")

    def reason(self):
        """The line of the log that says why the server stopped."""
        lines = [ln.strip() for ln in self.log.splitlines() if ln.strip()]
        for ln in reversed(lines):
            if ln.startswith("mandos: ") or re.match(r"[\w.]+(Error|Exception)(: |$)", ln):
                if not self.NOISE.search(ln):
                    return ln
        return lines[-1] if lines else "(no output, exit %s)" % self.status


# ---------------------------------------------------------------- differences

class Differences:
    """t/differences: blocks of "field: value" lines, blank-line separated."""

    KINDS = {"accept": ["refused-by"], "property": ["property"], "client": ["missing-from"],
             "bus": ["failed-on"], "version": ["refused-by", "line"], "elsewhere": ["test"]}
    REGEX_FIELDS = ["log", "input", "name", "ours", "ref", "line"]

    def __init__(self, path, extra=()):
        self.extra = set(extra)
        self.entries = []
        block = {}
        lineno = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if line.startswith("#"):
                    continue
                if not line.strip():
                    if block:
                        self.add(block, path)
                    block = {}
                    continue
                key, sep, value = line.partition(":")
                if not sep or key != key.strip() or key in block:
                    raise SystemExit("%s:%d: bad line: %s" % (path, lineno, line))
                block[key] = value.strip()
                block.setdefault("_line", lineno)
        if block:
            self.add(block, path)

    def add(self, e, path):
        where = "%s:%d" % (path, e["_line"])
        for need in ("id", "what", "kind"):
            if need not in e:
                raise SystemExit("%s: entry without %s" % (where, need))
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", e["id"]):
            raise SystemExit("%s: id %r: lower-case words joined by '-'" % (where, e["id"]))
        if e["kind"] not in self.KINDS:
            raise SystemExit("%s: unknown kind %r" % (where, e["kind"]))
        for need in self.KINDS[e["kind"]]:
            if need not in e:
                raise SystemExit("%s: a %s entry needs %s" % (where, e["kind"], need))
        for need in self.extra:
            if need not in e:
                raise SystemExit("%s: entry without %s" % (where, need))
        known = {"id", "what", "kind", "_line", "refused-by", "property", "missing-from",
                 "failed-on", "test"} | set(self.REGEX_FIELDS) | self.extra
        for k in e:
            if k not in known:
                raise SystemExit("%s: unknown field %r" % (where, k))
        # no catch-alls: every entry names a specific input or message
        specific = [k for k in self.REGEX_FIELDS if k in e]
        if e["kind"] == "elsewhere":
            if specific:
                raise SystemExit("%s: an elsewhere entry has no matcher" % where)
        elif not specific:
            raise SystemExit("%s: %s says neither log, input, name, ours, ref nor line"
                             % (where, e["id"]))
        for k in specific:
            try:
                rx = re.compile(e[k], re.M)
            except re.error as err:
                raise SystemExit("%s: %s: bad regex: %s" % (where, k, err))
            if rx.search(""):
                raise SystemExit("%s: %s: %r matches anything" % (where, k, e[k]))
        if any(x["id"] == e["id"] for x in self.entries):
            raise SystemExit("%s: id %s twice" % (where, e["id"]))
        self.entries.append(e)

    def match(self, d):
        """The ids of the entries that explain disagreement D (a dict)."""
        ids = []
        for e in self.entries:
            if e["kind"] != d["kind"]:
                continue
            ok = True
            for field in ("refused-by", "property", "missing-from", "failed-on"):
                if field in e and e[field] != d.get(field):
                    ok = False
            for field in self.REGEX_FIELDS:
                if ok and field in e:
                    if d.get(field) is None or not re.search(e[field], d[field], re.M):
                        ok = False
            if ok:
                ids.append(e["id"])
        return ids


# ---------------------------------------------------------------- compare

def config_text(confdir):
    parts = []
    for name in ("mandos.conf", "clients.conf"):
        p = os.path.join(confdir, name)
        if os.path.exists(p):
            with open(p, "rb") as f:
                parts.append("== %s\n" % name + f.read().decode("utf-8", "backslashreplace"))
    return "\n".join(parts)


def compare(ours, ref, text):
    """The list of disagreements between two Runs on one configuration."""
    out = []
    if ours.accepted != ref.accepted:
        refuser = ours if not ours.accepted else ref
        out.append({"kind": "accept", "refused-by": refuser.side, "log": refuser.log,
                    "input": text,
                    "show": "%s refuses (%s), the other accepts" % (refuser.side,
                                                                   refuser.reason())})
        return out
    if not ours.accepted:
        return out
    if (ours.objects is None) != (ref.objects is None):
        failed = ours if ours.objects is None else ref
        out.append({"kind": "bus", "failed-on": failed.side, "log": failed.bus_error,
                    "input": text,
                    "show": "GetManagedObjects fails on %s: %s" % (failed.side, failed.bus_error)})
        return out
    if ours.objects is None:
        return out
    by_name = [{}, {}]
    for i, run in enumerate((ours, ref)):
        for path, props in run.objects.items():
            props = dict(props)
            props["path"] = path
            by_name[i][props.get("Name")] = props
    for name in sorted(set(by_name[0]) | set(by_name[1]), key=str):
        if name not in by_name[0] or name not in by_name[1]:
            side = "ours" if name not in by_name[0] else "ref"
            out.append({"kind": "client", "missing-from": side, "name": name, "input": text,
                        "show": "client %r missing from %s" % (name, side)})
            continue
        a, b = by_name[0][name], by_name[1][name]
        for side, props in (("ours", a), ("ref", b)):
            if props["path"] != props.get("ObjectPath"):
                out.append({"kind": "property", "property": "path", "name": name,
                            side: json.dumps(props["path"]), "input": text,
                            "show": "client %r: %s exports it at %s, not at its ObjectPath %s"
                            % (name, side, props["path"], json.dumps(props.get("ObjectPath")))})
        for prop in PROPS:
            if a.get(prop) != b.get(prop):
                out.append({"kind": "property", "property": prop, "name": name,
                            "ours": json.dumps(a.get(prop), ensure_ascii=False),
                            "ref": json.dumps(b.get(prop), ensure_ascii=False),
                            "input": text,
                            "show": "client %r %s: ours %s, ref %s" % (
                                name, prop, json.dumps(a.get(prop), ensure_ascii=False),
                                json.dumps(b.get(prop), ensure_ascii=False))})
    return out


class Driver:
    def __init__(self):
        self.ours_bin = os.environ.get("MANDOS_BIN", os.path.join(TOP, "mandos"))
        self.ref_bin = os.environ.get("REF_BIN", "/usr/sbin/mandos")
        self.diffs = Differences(os.path.join(TOP, "t", "differences"))
        self.known = Differences(os.path.join(HERE, "known-failing"), extra=["issue"])
        self.work = tempfile.mkdtemp(prefix="mandos-difftest.")
        os.chmod(self.work, 0o755)
        self.buses = {}

    def bus(self, side):
        b = self.buses.get(side)
        if b is None or b.proc.poll() is not None:
            b = self.buses[side] = Bus()
        return b

    def close(self):
        for b in self.buses.values():
            b.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def run_both(self, confdir, workdir, cwd=None):
        runs = {}

        def one(side, binary):
            runs[side] = Run(binary, self.bus(side), confdir, workdir, side, cwd=cwd)
        self.bus("ours")
        self.bus("ref")
        threads = [threading.Thread(target=one, args=("ours", self.ours_bin)),
                   threading.Thread(target=one, args=("ref", self.ref_bin))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return runs["ours"], runs["ref"]

    def classify(self, d):
        """(ids of t/differences, issue items of known-failing) for D."""
        ids = self.diffs.match(d)
        items = []
        if not ids:
            for e in self.known.entries:
                if e["id"] in self.known.match(d):
                    items.append(e["issue"])
        return ids, items

    def judge(self, confdir, workdir, cwd=None):
        """("agree" | "documented" | "undocumented", [(disagreement, ids, items)])."""
        ours, ref = self.run_both(confdir, workdir, cwd)
        found = [(d,) + self.classify(d) for d in compare(ours, ref, config_text(confdir))]
        if not found:
            return "agree", found
        if all(ids for _, ids, _ in found):
            return "documented", found
        return "undocumented", found


def report(label, outcome, found):
    for d, ids, items in found:
        if ids:
            tag = "documented " + ",".join(ids)
        elif items:
            tag = "UNDOCUMENTED, KNOWN-FAILING (issue %s)" % ",".join(items)
        else:
            tag = "UNDOCUMENTED"
        print("%s: %s: %s" % (label, tag, d["show"]))


def only_known(found):
    """Every undocumented disagreement in FOUND is a known failure."""
    return all(ids or items for _, ids, items in found)


# ---------------------------------------------------------------- keys

def keys_json(path):
    """Make (once) the key sets KEY_SETS with t/lib.bash's keys_for; write
    their key_id and OpenPGP fingerprint to PATH."""
    keys = []
    for name in KEY_SETS:
        out = subprocess.run(["bash", "-c", 'source "$1"; keys_for "$2"', "-",
                              os.path.join(TOP, "t", "lib.bash"), name],
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise SystemExit("keys_for %s failed: %s" % (name, out.stderr))
        keys.append(key_ids(out.stdout.strip()))
    with open(path, "w") as f:
        json.dump(keys, f)
    return keys


def key_ids(keydir):
    """key_id: SHA-256 of the DER public key; fingerprint: the OpenPGP v4
    fingerprint (SHA-1 over 0x99, length, the public-key packet body)."""
    with open(os.path.join(keydir, "tls-pubkey.pem")) as f:
        der = base64.b64decode("".join(ln for ln in f.read().splitlines()
                                       if ln and not ln.startswith("-----")))
    kid = hashlib.sha256(der).hexdigest()
    with open(os.path.join(keydir, "pubkey.txt")) as f:
        lines = f.read().splitlines()
    body = lines[lines.index("") + 1:]
    data = base64.b64decode("".join(ln for ln in body if not ln.startswith(("=", "-----"))))
    tag = data[0]
    if tag & 0x40:      # new format header
        n = data[1]
        if n < 192:
            start, length = 2, n
        else:
            start, length = 3, ((n - 192) << 8) + data[2] + 192
    else:               # old format: length type in the two low bits
        ltype = tag & 3
        size = {0: 1, 1: 2, 2: 4}[ltype]
        start, length = 1 + size, int.from_bytes(data[1:1 + size], "big")
    packet = data[start:start + length]
    fpr = hashlib.sha1(b"\x99" + len(packet).to_bytes(2, "big") + packet).hexdigest().upper()
    return {"key_id": kid, "fingerprint": fpr}


# ---------------------------------------------------------------- commands

def cmd_random(drv, n, seed):
    keys = keys_json(os.path.join(drv.work, "keys.json"))
    counts = {"agree": 0, "documented": 0, "undocumented": 0}
    known = 0
    items = set()
    features = {}
    keep = os.environ.get("DIFFTEST_KEEP")
    for i in range(n):
        label = "%s:%d" % (seed, i)
        confdir = os.path.join(drv.work, "conf%d" % i)
        for name in gen.generate(label, keys, confdir):
            features[name] = features.get(name, 0) + 1
        workdir = tempfile.mkdtemp(dir=drv.work)
        os.chmod(workdir, 0o755)
        outcome, found = drv.judge(confdir, workdir)
        counts[outcome] += 1
        if outcome == "undocumented" and only_known(found):
            known += 1
            items |= {i for _, _, its in found for i in its}
        if outcome != "agree":
            report("seed " + label, outcome, found)
        if outcome == "undocumented" and keep:
            dest = os.path.join(keep, label.replace(":", "-").replace("/", "_"))
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(confdir, dest)
            for side in ("ours", "ref"):
                shutil.copy(os.path.join(workdir, side + ".log"), dest)
        shutil.rmtree(confdir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        sys.stdout.flush()
    print("features exercised (configurations):")
    for name in sorted(features):
        print("  %-40s %d" % (name, features[name]))
    if counts["undocumented"]:
        print("of the undocumented: %d only known failures (issue %s), %d new"
              % (known, " ".join(sorted(items)) or "-", counts["undocumented"] - known))
    print("%d configs, %d agree, %d documented, %d undocumented"
          % (n, counts["agree"], counts["documented"], counts["undocumented"]))
    if counts["undocumented"] > known:
        return 1
    return 2 if counts["undocumented"] else 0


def cmd_case(drv, dirs):
    """Each DIR holds the files (a file "missing-configdir" means: point
    --configdir at a directory that does not exist) and "expect", one line:
      agree                 both servers agree
      documented ID...      they differ, exactly as these entries say
      known-failing ITEM    an undocumented difference, issue item ITEM of
                            t/difftest/known-failing: reported as such while
                            it lasts; once it is gone the case fails, so
                            that its expectation gets flipped"""
    bad = 0
    for d in dirs:
        name = os.path.basename(d.rstrip("/"))
        with open(os.path.join(d, "expect")) as f:
            expect = f.read().split()
        confdir = os.path.join(drv.work, name)
        shutil.copytree(d, confdir)
        os.chmod(confdir, 0o755)
        cwd = None
        if os.path.exists(os.path.join(d, "missing-configdir")):
            cwd = confdir
            confdir = os.path.join(confdir, "no-such-directory")
        workdir = tempfile.mkdtemp(dir=drv.work)
        os.chmod(workdir, 0o755)
        outcome, found = drv.judge(confdir, workdir, cwd)
        ids = sorted({i for _, got, _ in found for i in got})
        items = sorted({i for _, _, its in found for i in its})
        report("case " + name, outcome, found)
        if expect[0] == "agree":
            ok = outcome == "agree"
        elif expect[0] == "documented":
            ok = outcome == "documented" and ids == sorted(expect[1:])
        elif expect[0] == "known-failing":
            ok = outcome == "undocumented" and only_known(found) and items == expect[1:2]
            if ok:
                print("case %s: KNOWN-FAILING (issue %s): undocumented, as expected until "
                      "mandos.c is fixed" % (name, expect[1]))
            elif outcome != "undocumented":
                print("case %s: now %s: issue %s looks fixed; flip t/difftest/cases/%s/expect "
                      "and drop its entry from t/difftest/known-failing"
                      % (name, outcome, expect[1], name))
        else:
            raise SystemExit("%s/expect: unknown expectation %r" % (d, expect[0]))
        if not ok:
            print("case %s: FAILED: expected %s, got %s %s" % (
                name, " ".join(expect), outcome, " ".join(ids + items)))
            bad += 1
        else:
            print("case %s: ok (%s)" % (name, " ".join(expect)))
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bad else 0


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd = sys.argv[1]
    if cmd == "list-ids":
        for e in Differences(os.path.join(TOP, "t", "differences")).entries:
            print(e["id"])
        return 0
    drv = Driver()
    try:
        if cmd == "random":
            return cmd_random(drv, int(sys.argv[2]), sys.argv[3])
        if cmd == "case":
            return cmd_case(drv, sys.argv[2:])
        if cmd == "version":
            import version
            return version.run(drv)
        raise SystemExit(__doc__)
    finally:
        drv.close()


if __name__ == "__main__":
    sys.exit(main())
