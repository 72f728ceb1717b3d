"""The protocol version line, fed alike to ./mandos and the reference
(driver.py version).  Each line goes to a fresh connection to each server;
what the server does next is its verdict:

    accept   it starts TLS: its first byte is 0x16 (a ClientHello)
    refuse   it closes the connection without sending anything
    silent   neither within WAIT seconds (it waits for more)

A verdict that differs between the servers is a disagreement of kind
"version", matched against t/differences by the line's label.
"""

import os
import shutil
import socket
import tempfile
import threading
import time

WAIT = 3.0

# (label, bytes sent, half-close afterwards?).  The label is what the
# "line:" matchers of t/differences see.
LINES = [
    ("1\\r\\n", b"1\r\n", False),
    ("1\\n", b"1\n", False),
    ("1 \\r\\n", b"1 \r\n", False),
    (" 1\\r\\n", b" 1\r\n", False),
    ("1\\t\\r\\n", b"1\t\r\n", False),
    ("1 extra words\\r\\n", b"1 extra words\r\n", False),
    ("0\\r\\n", b"0\r\n", False),
    ("-7\\r\\n", b"-7\r\n", False),
    ("+1\\r\\n", b"+1\r\n", False),
    ("01\\r\\n", b"01\r\n", False),
    ("1_0\\r\\n", b"1_0\r\n", False),
    ("2\\r\\n", b"2\r\n", False),
    ("10\\r\\n", b"10\r\n", False),
    ("1.0\\r\\n", b"1.0\r\n", False),
    ("abc\\r\\n", b"abc\r\n", False),
    ("\\r\\n", b"\r\n", False),
    ("blanks\\r\\n", b"   \r\n", False),
    ("EOF at once", b"", True),
    ("1 then EOF", b"1", True),
    ("1\\r (lone CR)", b"1\r", False),
    ("1\\r then EOF", b"1\r", True),
    ("1\\x00\\r\\n (NUL)", b"1\x00\r\n", False),
    ("\\x00\\r\\n (NUL)", b"\x00\r\n", False),
    ("1\\xff\\r\\n (not UTF-8)", b"1\xff\r\n", False),
    ("Arabic-Indic digit one\\r\\n", "\u0661\r\n".encode(), False),
    ("1 then 100 blanks\\r\\n", b"1" + b" " * 100 + b"\r\n", False),
    ("100 zeros then 1\\r\\n", b"0" * 100 + b"1\r\n", False),
    ("1 then 100000 blanks, no newline", b"1" + b" " * 100000, False),
    ("-99999999999999999999999\\r\\n", b"-99999999999999999999999\r\n", False),
    ("99999999999999999999999\\r\\n", b"99999999999999999999999\r\n", False),
]


def probe(port, data, half_close):
    """Send DATA on a new connection; return the verdict."""
    try:
        s = socket.create_connection(("::1", port), timeout=10)
    except OSError as e:
        return "no-connection (%s)" % e
    try:
        if data:
            s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        s.settimeout(WAIT)
        try:
            first = s.recv(1)
        except socket.timeout:
            return "silent"
        except OSError:
            return "refuse"
        if not first:
            return "refuse"
        return "accept" if first == b"\x16" else "other (0x%02x)" % first[0]
    except OSError:
        return "refuse"
    finally:
        s.close()


def write_config(confdir, key):
    os.makedirs(confdir)
    os.chmod(confdir, 0o755)
    with open(os.path.join(confdir, "clients.conf"), "w") as f:
        f.write("[DEFAULT]\nchecker = true\ntimeout = PT1H\n\n[probe]\n"
                "key_id = %s\nfingerprint = %s\nsecret = aGVsbG8=\n"
                % (key["key_id"], key["fingerprint"]))


def verdicts(port):
    """{label: verdict} for every line, probed in parallel (bounded)."""
    out = {}

    def one(label, data, half):
        out[label] = probe(port, data, half)
    threads = [threading.Thread(target=one, args=line) for line in LINES]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    return out


def run(drv):
    import driver
    keys = driver.keys_json(os.path.join(drv.work, "keys.json"))
    confdir = os.path.join(drv.work, "version-conf")
    write_config(confdir, keys[0])
    workdir = tempfile.mkdtemp(dir=drv.work)
    os.chmod(workdir, 0o755)
    results = {}

    def side(name, binary):
        results[name] = driver.Run(binary, drv.bus(name), confdir, workdir, name,
                                   during=verdicts)
    threads = [threading.Thread(target=side, args=("ours", drv.ours_bin)),
               threading.Thread(target=side, args=("ref", drv.ref_bin))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ours, ref = results["ours"], results["ref"]
    for run_ in (ours, ref):
        if run_.during is None:
            print("version: %s did not start: %s" % (run_.side, run_.reason()))
            return 1
    undocumented = 0
    documented = 0
    known = 0
    for label, _, _ in LINES:
        a, b = ours.during.get(label), ref.during.get(label)
        if a == b:
            print("version %-40s both %s" % (label, a))
            continue
        refuser = "ours" if a == "refuse" else "ref" if b == "refuse" else "neither"
        d = {"kind": "version", "line": label, "ours": a, "ref": b, "refused-by": refuser}
        ids, items = drv.classify(d)
        if ids:
            tag = "documented " + ",".join(ids)
            documented += 1
        elif items:
            tag = "UNDOCUMENTED, KNOWN-FAILING (issue %s)" % ",".join(items)
            undocumented += 1
            known += 1
        else:
            tag = "UNDOCUMENTED"
            undocumented += 1
        print("version %-40s ours %s, ref %s: %s" % (label, a, b, tag))
    print("%d version lines, %d agree, %d documented, %d undocumented"
          % (len(LINES), len(LINES) - documented - undocumented, documented, undocumented))
    if undocumented:
        print("of the undocumented: %d known failures, %d new" % (known, undocumented - known))
    shutil.rmtree(workdir, ignore_errors=True)
    if undocumented > known:
        return 1
    return 2 if undocumented else 0
