"""Packaging for geproxy: the core package and the built-in plugins."""

from setuptools import setup

setup(
    name="geproxy",
    version="0.1.0",
    description="A forward proxy for corporate egress: CONNECT tunnels and plain HTTP, "
    "on gevent, with pluggy policy plugins",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["geproxy", "geproxy.testing", "geproxy_plugins"],
    package_dir={"geproxy": "geproxy", "geproxy_plugins": "plugins"},
    package_data={"geproxy": ["py.typed"], "geproxy_plugins": ["py.typed"]},
    install_requires=[
        "gevent>=23.9",
        "pluggy>=1.3",
        "cachetools>=5.3",
        "httptools>=0.6",
        "dnspython>=2.4",
        "libpass[bcrypt]>=1.9",
        "prometheus_client>=0.17",
        "h2>=4.1",
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "trustme>=1.1",
            "requests>=2.31",
            "dnslib>=0.9.23",
            "hypothesis>=6.80",
            "atheris>=2.3; sys_platform == 'linux'",
        ],
    },
    entry_points={
        "console_scripts": ["geproxy = geproxy.cli:main"],
        "pytest11": ["geproxy = geproxy.testing"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Pytest",
        "Topic :: Internet :: Proxy Servers",
    ],
)
