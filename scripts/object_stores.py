"""Creates the test bucket and container in the emulators scripts/object-stores.sh started.

Usage: object_stores.py S3_ENDPOINT AZURITE_URL NAME
Waits (up to a minute) for both servers to answer, then creates NAME in each; an existing
one is fine. Uses the vendors' own clients (boto3, which moto brings, and azure-storage-blob).
"""

import sys
import time

import boto3
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import BlobServiceClient

# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def retrying(what, fn):
    deadline = time.monotonic() + 60
    while True:
        try:
            return fn()
        except Exception as e:  # the server is still starting
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not answer within a minute: {e}")
            time.sleep(0.5)


def main():
    s3_endpoint, azurite_url, name = sys.argv[1:4]
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="cairn",
        aws_secret_access_key="cairn-secret",
        region_name="us-east-1",
    )

    def bucket():
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass

    retrying("moto_server", bucket)
    conn = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={azurite_url}/devstoreaccount1;"
    )
    service = BlobServiceClient.from_connection_string(conn)

    def container():
        try:
            service.create_container(name)
        except ResourceExistsError:
            pass

    retrying("azurite", container)


if __name__ == "__main__":
    main()
