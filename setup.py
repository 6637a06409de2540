from setuptools import find_packages, setup

setup(
    name="dit4c",
    version="0.1.0",
    description="Data Intensive Tools for the Cloud: research tools in containers, in the browser",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["dit4c", "dit4c.*"]) + ["twisted.plugins"],
    package_data={"dit4c": ["py.typed", "portal/templates/*.html", "portal/static/*"], "twisted": ["plugins/dit4c_plugins.py"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls,conch]>=24.7",  # conch: the file server speaks SFTP
        "klein>=24.8",
        "treq>=24.9",
        "autobahn>=24.4",
        "pyopenssl>=24.0",
        "service-identity>=24.1",
        "cryptography>=42",
        # JWT/JWK: the maintained implementation; pinned algorithms, aud/exp checks.
        "pyjwt[crypto]>=2.8",
        # Prometheus text exposition for admin endpoints.
        "prometheus-client>=0.20",
        # llhttp (Node's HTTP parser) bindings: fast, strict HTTP/1.1 request heads.
        "httptools>=0.6",
        "automat>=24.8",
        "zope.interface>=6",
        # Argon2id password hashing: the reference binding.
        "argon2-cffi>=23.1",
        # Templates with autoescaping for the portal's pages, and Jinja's own
        # escaping library (a part of a page made once is marked safe with it).
        "jinja2>=3.1",
        "markupsafe>=2.1",
        # Signed, timed cookie values (the auth helper's login flow): the well-kept library for them.
        "itsdangerous>=2.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            # The suite in parallel worker processes: its tests wait on real
            # servers' deadlines more than they use the CPU.
            "pytest-xdist>=3.6",
            "hypothesis>=6.100",
            "psutil>=5.9",
            # The store's tests run against a real PostgreSQL too.
            "psycopg[binary]>=3.1",
            "selenium>=4.20",
            # A real JupyterLab behind the auth helper (tests/auth/test_jupyterlab.py).
            "jupyterlab>=4",
            # The image server's S3 storage, tested against moto's S3 server.
            "boto3>=1.36",
            "moto[server]>=5",
        ],
        "lint": ["ruff>=0.5", "mypy>=1.10", "mypy-zope>=1.0"],
        "tor": ["txtorcon>=24.8"],
        "postgres": ["psycopg[binary]>=3.1"],
        # The image server's S3(-compatible) storage (--storage s3).
        "s3": ["boto3>=1.36"],
    },
    entry_points={"console_scripts": ["dit4c=dit4c.cli:main"]},
)
