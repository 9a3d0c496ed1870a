"""Packaging for geproxy: the core package and the built-in plugins."""

from setuptools import setup

#: The test kit's needs (geproxy.testing imports pytest, trustme, cryptography and dnslib;
#: tests use pytest-timeout's timeouts and requests as a client).
TESTING = [
    "pytest>=7.4",
    "pytest-timeout>=2.2",
    "trustme>=1.1",
    "cryptography>=3.1",
    "requests>=2.31",
    "dnslib>=0.9.23",
]

setup(
    name="geproxy",
    version="0.1.0",
    description="A forward proxy for corporate egress: CONNECT tunnels and plain HTTP, "
    "on gevent, with pluggy policy plugins",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    # What CI runs: only 3.11 is on its machines (plugins.py calls entry_points(group=...),
    # which 3.9 lacks).
    python_requires=">=3.11",
    packages=["geproxy", "geproxy.protocol", "geproxy.net", "geproxy.policy", "geproxy.relay",
              "geproxy.serve", "geproxy.testing", "geproxy_plugins", "geproxy_plugins.acl",
              "geproxy_plugins.auth", "geproxy_plugins.external"],
    package_dir={"geproxy": "geproxy", "geproxy_plugins": "plugins"},
    package_data={"geproxy": ["py.typed"], "geproxy_plugins": ["py.typed"]},
    install_requires=[
        "gevent>=23.9",
        # geproxy/dispatch.py reads two private names of pluggy: the versions its tests
        # (tests/test_dispatch.py) passed on.
        "pluggy>=1.6,<1.8",
        "cachetools>=5.3",
        "httptools>=0.6",
        "dnspython>=2.4",
        "libpass[bcrypt]>=1.9",
        "prometheus_client>=0.17",
        "h2>=4.1",
        # The acl plugin's url_regex: RE2 matches in linear time, whatever the pattern.
        "google-re2>=1.1",
        # [auth] ldap_url: pure Python, so its sockets are gevent's.
        "ldap3>=2.9",
    ],
    extras_require={
        # [auth] keytab (Kerberos, Negotiate): python-gssapi builds against the system's
        # MIT Kerberos (Debian: libkrb5-dev and gcc).
        "kerberos": ["gssapi>=1.8"],
        # What the test kit (geproxy.testing) needs: a plugin author's tests install this.
        "testing": TESTING,
        # geproxy's own development: the kit's needs, the property tests and the fuzzer,
        # and the static checks .ci/run runs (their ranges are bumped on purpose, so that a
        # checker's new release cannot fail a build by itself).
        "dev": TESTING + [
            "hypothesis>=6.80",
            "atheris>=2.3; sys_platform == 'linux'",
            "ruff~=0.17.6",
            "mypy~=2.4.1",
            # The layers contract of the package layout, checked in CI.
            "import-linter~=2.17.0",
            # The alert rules and their unit tests (etc/prometheus/), read by the tests.
            "pyyaml>=6",
        ],
    },
    entry_points={
        "console_scripts": ["geproxy = geproxy.cli:main"],
        "pytest11": ["geproxy = geproxy.testing"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Framework :: Pytest",
        "Topic :: Internet :: Proxy Servers",
    ],
)
