#!/usr/bin/env python3
"""Random but plausible mandos.conf/clients.conf pairs for the differential
test (t/difftest/driver.py).  Standard library only.

    gen.py --keys KEYS.json --seed SEED --out DIR

writes DIR/mandos.conf (or leaves it out), DIR/clients.conf, any secret
files, and DIR/features (one exercised feature a line).  The same seed and
key list always give the same files.  KEYS.json is a list of
{"key_id": ..., "fingerprint": ...} of real key sets (made by
mandos-keygen; the driver builds the list).

Every generated client has a checker that cannot fail and cannot reach the
network (it starts with `true` or `:`), and a timeout of a minute or more,
so that Enabled stays what the file says while the servers are compared.
"""

import argparse
import json
import os
import random

# Bytes that are safe inside a checker command run by /bin/sh: a value
# made of these can be passed to `true` without starting another command.
SAFE_WORD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"

DURATION_KEYS = ["timeout", "extended_timeout", "interval",
                 "approval_delay", "approval_duration"]
BOOL_KEYS = ["enabled", "approved_by_default"]
TRUE_WORDS = ["1", "yes", "true", "on"]
FALSE_WORDS = ["0", "no", "false", "off"]


class Gen:
    def __init__(self, seed, keys):
        self.r = random.Random(seed)
        self.keys = keys
        self.features = []
        self.files = {}
        self.chains = 0

    def feat(self, name):
        self.features.append(name)

    def chance(self, p):
        return self.r.random() < p

    # ------------------------------------------------------------ lexical

    def key_spelling(self, key):
        """The key as written: usually as is, sometimes in another case."""
        if self.chance(0.12):
            self.feat("key-case")
            pick = self.r.choice([str.upper, str.title,
                                  lambda s: "".join(self.r.choice([c.upper(), c]) for c in s)])
            return pick(key)
        return key

    def blank(self):
        """Whitespace around a delimiter: mostly one space, sometimes odd."""
        if self.chance(0.15):
            self.feat("odd-whitespace")
            return self.r.choice(["", "  ", "\t", " \t ", "   "])
        return " "

    def option(self, key, value, indent=""):
        """Lines of one option, possibly split over continuation lines."""
        delim = "="
        if self.chance(0.2):
            delim = ":"
            self.feat("delim-colon")
        else:
            self.feat("delim-equals")
        pieces = value.split("\n")
        first = "%s%s%s%s%s%s" % (indent, self.key_spelling(key), self.blank(),
                                  delim, self.blank(), pieces[0])
        if value == "":
            first = first.rstrip(" \t")
        lines = [first]
        for piece in pieces[1:]:
            self.feat("continuation")
            if self.chance(0.2):
                self.feat("comment-in-continuation")
                lines.append(indent + "  " + self.r.choice(["#", ";"]) + " inside a value")
            lines.append(indent + self.r.choice(["  ", "\t", "    "]) + piece)
        if self.chance(0.1):
            self.feat("trailing-blanks")
            lines[-1] += self.r.choice([" ", "\t", "  "])
        return lines

    def comment(self):
        mark = self.r.choice(["#", ";"])
        self.feat("comment-hash" if mark == "#" else "comment-semicolon")
        lead = self.r.choice(["", "", "  ", "\t"])
        return lead + mark + self.r.choice([" a comment", "", " key = value", " [section]"])

    # ------------------------------------------------------------ values

    def boolean(self, truth):
        word = self.r.choice(TRUE_WORDS if truth else FALSE_WORDS)
        style = self.r.choice(["lower", "lower", "upper", "title"])
        self.feat("bool-%s-%s" % (word, style))
        return {"lower": word, "upper": word.upper(), "title": word.title()}[style]

    def rfc3339(self, seconds):
        """An RFC 3339 duration of exactly SECONDS (>= 0), in varied shapes."""
        d, rest = divmod(seconds, 86400)
        h, rest = divmod(rest, 3600)
        m, s = divmod(rest, 60)
        if d and not (h or m or s) and d % 7 == 0 and self.chance(0.5):
            self.feat("duration-rfc3339-week")
            return "P%dW" % (d // 7)
        self.feat("duration-rfc3339")
        out = "P"
        if d:
            if d >= 364 and self.chance(0.5):
                self.feat("duration-rfc3339-year-month")
                y, d2 = divmod(d, 364)
                mo, d2 = divmod(d2, 28)
                out += "%dY%dM%dD" % (y, mo, d2)
            else:
                out += "%dD" % d
        if h or m or s or not d:
            out += "T"
            if h:
                out += "%dH" % h
                out += "%dM" % m
                if s:
                    out += "%dS" % s
            elif m:
                out += "%dM" % m
                if s:
                    out += "%dS" % s
            else:
                out += "%dS" % s
        return out

    def old_form(self, seconds):
        """The old syntax ("5m 30s") for SECONDS, tokens in any order."""
        self.feat("duration-old")
        tokens = []
        for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            n, seconds = divmod(seconds, size)
            if n:
                tokens.append("%d%s" % (n, unit))
        if not tokens:
            tokens = ["0s"]
        if len(tokens) > 1 and self.chance(0.3):
            self.feat("duration-old-shuffled")
            self.r.shuffle(tokens)
        if self.chance(0.1):
            self.feat("duration-old-repeated")
            first = tokens[0]
            n = int(first[:-1])
            if n % 2 == 0 and n > 0:
                tokens[0:1] = ["%d%s" % (n // 2, first[-1])] * 2
        if self.chance(0.15) and len(tokens) > 1:
            joined = "\n".join(tokens)
        else:
            joined = self.r.choice([" ", "  ", "\t"]).join(tokens)
        return joined

    def duration(self, key):
        """A valid duration for KEY; timeouts stay a minute or more."""
        if key in ("timeout", "extended_timeout"):
            seconds = self.r.choice([60, 300, 3600, 5400, 86400, 90061, 7 * 86400,
                                     self.r.randint(60, 400 * 86400)])
        elif key == "interval":
            seconds = self.r.choice([1, 30, 120, 600, 3661, self.r.randint(1, 20 * 86400)])
        else:
            seconds = self.r.choice([0, 0, 1, 5, 60, 3600, self.r.randint(0, 86400)])
        if self.chance(0.5):
            return self.rfc3339(seconds)
        return self.old_form(seconds)

    def odd_duration(self, key):
        """A duration one of the servers may take otherwise (rare)."""
        pick = self.r.choice(["P2000Y", "-5m", "0s", "1h30m", "pt5m", "PT", "5",
                              "P1Y1D", "PT1H1S", "1_0m", "+5m", "P1YT1H"])
        if key in ("timeout", "extended_timeout") and pick in ("0s", "-5m"):
            pick = "P2000Y"
        self.feat("duration-odd")
        return pick

    def client_name(self, taken):
        parts = ["web", "db", "host", "alpha", "x", "node7", "A", "srv", "Beta"]
        seps = [".", "-", "_", "/", " ", ""]
        while True:
            n = self.r.choice([1, 1, 2, 2, 3])
            name = self.r.choice(parts)
            for _ in range(n - 1):
                sep = self.r.choice(seps)
                word = self.r.choice(parts)
                digit = str(self.r.randint(0, 9)) if self.chance(0.3) else ""
                name += sep + word + digit
            if self.chance(0.03):
                name = self.r.choice([name + "/", "/" + name, name.replace("/", "//") + "//x",
                                      name + "é", " " + name])
            if name not in taken and name != "DEFAULT":
                break
        for ch, label in ((".", "dot"), ("-", "dash"), ("/", "slash"), (" ", "space"),
                          ("_", "underscore")):
            if ch in name:
                self.feat("name-" + label)
        if any(ord(c) > 127 for c in name):
            self.feat("name-non-ascii")
        return name

    def key_id_text(self, kid):
        style = self.r.choice(["lower", "lower", "upper", "spaced", "mixed"])
        self.feat("key_id-" + style)
        if style == "upper":
            return kid.upper()
        if style == "spaced":
            return " ".join(kid[i:i + 8] for i in range(0, len(kid), 8))
        if style == "mixed":
            return "".join(self.r.choice([c.upper(), c]) for c in kid)
        return kid

    def secret_text(self):
        """Base64 of random bytes, sometimes split over lines."""
        import base64
        raw = bytes(self.r.randrange(256) for _ in range(self.r.randint(1, 90)))
        text = base64.b64encode(raw).decode()
        if len(text) > 24 and self.chance(0.4):
            self.feat("secret-multiline")
            step = self.r.choice([8, 16, 20])
            text = "\n".join(text[i:i + step] for i in range(0, len(text), step))
        elif self.chance(0.1):
            self.feat("secret-inner-blanks")
            text = text[:4] + " " + text[4:]
        return text

    # ------------------------------------------------------------ chains

    def chain(self, section, default, target, value, where):
        """Make TARGET = %(v1)s -> ... -> VALUE, DEPTH links, variables
        placed in the section or in [DEFAULT]; return TARGET's text."""
        depth = self.r.choice([1, 1, 1, 2, 2, 3] * 3 + [4, 5, 6, 7, 8, 9, 10, 11, 12])
        self.feat("interpolation-chain")
        self.feat("interpolation-depth-%s" % (str(depth) if depth <= 9 else "%d" % depth))
        self.chains += 1
        prefix = "%s%d" % (where, self.chains)
        names = ["%s_%d" % (prefix, i) for i in range(1, depth + 1)]
        # [DEFAULT]'s keys are interpolated in every section, so once the
        # chain goes on in [DEFAULT] it must stay there
        split = depth if self.chance(0.6) else self.r.randint(0, depth)
        for i, name in enumerate(names):
            nxt = "%%(%s)s" % names[i + 1] if i + 1 < len(names) else value
            if i >= split:
                self.feat("interpolation-via-default")
                default.append((name, nxt))
            else:
                section.append((name, nxt))
        return "%%(%s)s" % names[0]

    # ------------------------------------------------------------ files

    def mandos_conf(self):
        if self.chance(0.2):
            self.feat("mandos.conf-absent")
            return None
        lines = []
        opts = []
        if self.chance(0.5):
            opts.append(("use_dbus", self.boolean(True)))
        if self.chance(0.3):
            opts.append(("restore", self.boolean(self.chance(0.5))))
        if self.chance(0.3):
            opts.append(("use_ipv6", self.boolean(True)))
        if self.chance(0.2):
            opts.append(("zeroconf", self.boolean(self.chance(0.5))))
        if self.chance(0.3):
            self.feat("mandos.conf-port")
            opts.append(("port", self.r.choice(["1025", "1_025", " +1025", "", "%(myport)s"])))
            if opts[-1][1] == "%(myport)s":
                self.feat("mandos.conf-interpolated")
                opts.append(("myport", "2048"))
        if self.chance(0.2):
            self.feat("mandos.conf-servicename")
            opts.append(("servicename", self.r.choice(["Mandos", "Test 100%", "Te%%st"])))
        if self.chance(0.2):
            self.feat("mandos.conf-priority")
            opts.append(("priority", "SECURE256:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL:"
                         "+VERS-TLS1.3:%PROFILE_ULTRA"))
        if self.chance(0.15):
            self.feat("mandos.conf-ours-only-key")
            opts.append(self.r.choice([("connection_timeout", "PT30S"),
                                       ("max_connections", "64")]))
        if self.chance(0.05):
            self.feat("mandos.conf-unknown-key-percent")
            opts.append(("unknown", self.r.choice(["100%", "%(nope)s"])))
        if self.chance(0.1):
            self.feat("mandos.conf-other-section")
            lines += ["[other]", "port = junk"]
        self.r.shuffle(opts)
        lines.append("[DEFAULT]")
        for k, v in opts:
            if self.chance(0.15):
                lines.append(self.comment())
            lines += self.option(k, v)
        return lines

    def client_section(self, name, kid, fpr, default_has_checker, default_has_secret):
        sec = []
        extra = []
        sec.append(("key_id", self.key_id_text(kid)))
        if self.chance(0.97):
            sec.append(("fingerprint", fpr))
        else:
            self.feat("fingerprint-missing")
        host_safe = True
        if self.chance(0.8):
            host = self.r.choice(["%s.example.org" % self.r.choice(["a", "web", "x1"]),
                                  "192.0.2.%d" % self.r.randint(1, 254), "2001:db8::1",
                                  "h%d" % self.r.randint(0, 9), "", "a b"])
            if self.chance(0.2):
                self.feat("host-percent-escape")
                host += "%%"
                host_safe = False
            if self.chance(0.25):
                host = self.chain(extra, self.default_extra, "host", host, "h")
            sec.append(("host", host))
        if not default_has_checker or self.chance(0.3):
            sec.append(("checker", self.checker(host_safe)))
        if not default_has_secret or self.chance(0.2):
            if self.chance(0.25):
                self.feat("secfile")
                path = "secret-%d.bin" % len(self.files)
                size = self.r.randint(0, 64)
                self.files[path] = bytes(self.r.randrange(256) for _ in range(size))
                if self.chance(0.5):
                    self.feat("secfile-relative")
                    sec.append(("secfile", path))
                else:
                    sec.append(("secfile", "%(confdir)s/" + path))
            else:
                self.feat("secret")
                sec.append(("secret", self.secret_text()))
        for key in DURATION_KEYS:
            if self.chance(0.35):
                value = self.odd_duration(key) if self.chance(0.04) else self.duration(key)
                if self.chance(0.1) and "\n" not in value:
                    value = self.chain(extra, self.default_extra, key, value, "d")
                sec.append((key, value))
                if key.startswith("approval"):
                    self.feat("approval-settings")
        for key in BOOL_KEYS:
            if self.chance(0.3):
                sec.append((key, self.boolean(self.chance(0.6))))
                if key == "approved_by_default":
                    self.feat("approval-settings")
        if self.chance(0.1):
            self.feat("unknown-client-key")
            sec.append(("ssh_fingerprint", self.r.choice(["SHA256:abc", "x 100%%", "%(host)s"])))
        sec += extra
        self.r.shuffle(sec)
        return sec

    def checker(self, host_safe):
        """A checker command that always succeeds and stays local."""
        forms = ["true", ": ping", "/bin/true %%%%", "true --", "true 100%%%%"]
        if host_safe:
            forms += ["true %%(host)s", "true -q -- %%(host)s", ": %(host)s",
                      "true %%(host)s %(host)s"]
        pick = self.r.choice(forms)
        if "%(host)s" in pick.replace("%%", ""):
            self.feat("checker-start-time-interpolation")
        if "%%(host)s" in pick:
            self.feat("checker-run-time-interpolation")
        return pick

    def clients_conf(self, confdir_hint):
        out = []
        self.default_extra = []
        default = []
        default_has_checker = self.chance(0.6)
        default_has_secret = self.chance(0.1)
        if default_has_checker:
            default.append(("checker", self.checker(True)))
        if default_has_secret:
            self.feat("secret-in-default")
            default.append(("secret", self.secret_text()))
        default.append(("confdir", confdir_hint))
        if self.chance(0.4):
            self.feat("default-override")
            for key in self.r.sample(DURATION_KEYS, self.r.randint(1, 3)):
                default.append((key, self.duration(key)))
        if self.chance(0.2):
            self.feat("default-override")
            default.append((self.r.choice(BOOL_KEYS), self.boolean(self.chance(0.7))))
        if self.chance(0.2):
            self.feat("default-late-interpolation")
            default.append(("host", "%(short)s.example.org"))
        n = self.r.choice([1, 1, 2, 2, 3, 4])
        keys = self.r.sample(self.keys, min(n, len(self.keys)))
        if n > 1 and self.chance(0.03):
            self.feat("duplicate-key_id")
            keys[1] = keys[0]
        names = []
        sections = []
        for k in keys:
            name = self.client_name(names)
            names.append(name)
            sec = self.client_section(name, k["key_id"], k["fingerprint"],
                                      default_has_checker, default_has_secret)
            if any(v == "%(short)s.example.org" for _, v in default) and \
                    not any(key == "host" for key, _ in sec):
                sec.append(("short", self.r.choice(["foo", "bar1"])))
            sections.append((name, sec))
        default += self.default_extra
        self.r.shuffle(default)
        split_default = len(default) > 2 and self.chance(0.15)
        if split_default:
            self.feat("default-twice")
            cut = self.r.randint(1, len(default) - 1)
            blocks = [("DEFAULT", default[:cut])] + sections + [("DEFAULT", default[cut:])]
        else:
            blocks = [("DEFAULT", default)] + sections
        for name, opts in blocks:
            if self.chance(0.2):
                out.append(self.comment())
            header = "[%s]" % name
            if self.chance(0.05):
                self.feat("header-trailing-text")
                header += " trailing words"
            out.append(header)
            indent = ""
            if self.chance(0.08):
                self.feat("indented-options")
                indent = "  "
            for k, v in opts:
                if self.chance(0.1):
                    out.append(self.comment())
                out += self.option(k, v, indent)
            if self.chance(0.5):
                out.append("")
        return out

    def render(self, lines):
        eol = "\n"
        if self.chance(0.08):
            self.feat("crlf")
            eol = "\r\n"
        return (eol.join(lines) + eol).encode("utf-8")


def generate(seed, keys, outdir):
    g = Gen(seed, keys)
    outdir = os.path.abspath(outdir)
    mc = g.mandos_conf()
    cc = g.clients_conf(outdir)
    os.makedirs(outdir, exist_ok=True)
    os.chmod(outdir, 0o755)
    if mc is not None:
        with open(os.path.join(outdir, "mandos.conf"), "wb") as f:
            f.write(g.render(mc))
    with open(os.path.join(outdir, "clients.conf"), "wb") as f:
        f.write(g.render(cc))
    for path, data in g.files.items():
        full = os.path.join(outdir, path)
        with open(full, "wb") as f:
            f.write(data)
        os.chmod(full, 0o644)
    with open(os.path.join(outdir, "features"), "w") as f:
        for name in sorted(set(g.features)):
            f.write(name + "\n")
    return sorted(set(g.features))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", required=True)
    ap.add_argument("--seed", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(a.keys) as f:
        keys = json.load(f)
    for name in generate(a.seed, keys, a.out):
        print(name)


if __name__ == "__main__":
    main()
