"""/docs and /redoc render offline: every asset they load is served by the app itself."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.main import create_app

# src="..." / href="..." and the url: '...' entries of the Swagger UI bundle's set-up.
ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.fixture(scope="module")
def client() -> TestClient:
    # No lifespan (no ``with``): the pages need no database.
    return TestClient(create_app())


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert "://" not in response.text, "the page names an outside address"
    urls = [a or b for a, b in ASSET.findall(response.text)]
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts, f"no script found in {page}: {response.text[:500]}"
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from outside the app"
        asset = client.get(url)
        assert asset.status_code == 200, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"], url
            assert len(asset.content) > 100_000, url  # the real bundle, not a stub
        elif url.endswith(".css"):
            assert asset.headers["content-type"].startswith("text/css"), url
