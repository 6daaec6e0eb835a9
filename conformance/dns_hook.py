#!/usr/bin/env python3
"""DNS hook for ACME clients in conformance tests: writes TXT records into the JSON file that
the test's DNS server (tests/acme_responders.DnsServer) answers from, as a DNS provider's API
would. Standard library only (it runs under the clients' own Python, never our venv).

  lego exec provider:      dns_hook.py present|cleanup FQDN VALUE
  certbot manual hooks:    dns_hook.py certbot-auth|certbot-cleanup   (CERTBOT_DOMAIN, CERTBOT_VALIDATION)
The file is named by SCEPD_TEST_DNS_RECORDS.
"""
import fcntl
import json
import os
import sys


def main() -> int:
    path = os.environ["SCEPD_TEST_DNS_RECORDS"]
    action = sys.argv[1]
    if action.startswith("certbot-"):
        name = "_acme-challenge." + os.environ["CERTBOT_DOMAIN"].removeprefix("*.")
        value = os.environ["CERTBOT_VALIDATION"]
        action = "present" if action == "certbot-auth" else "cleanup"
    elif action in ("present", "cleanup"):
        name, value = sys.argv[2].rstrip(".").lower(), sys.argv[3]
    else:
        return 0  # lego's "timeout" and anything newer: nothing to do
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                records = json.load(f)
        except (FileNotFoundError, ValueError):
            records = {}
        values = records.setdefault(name, [])
        if action == "present" and value not in values:
            values.append(value)
        elif action == "cleanup" and value in values:
            values.remove(value)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f)
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
