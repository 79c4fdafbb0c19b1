"""Workload API clients that no one here wrote, driven by the e2e tests (tests/e2e/workload.rs).

Each command prints one line per fact the test checks, or `error <code> <message>` when the
call is refused:

  spiffe-x509 SOCKET         the official `spiffe` library (py-spiffe, on grpcio): the default
                             X.509-SVID, every SVID, the X.509 bundles
  grpc-default SOCKET        plain grpcio with the authority it picks itself for a Unix socket
                             (gRPC C-core sends the percent-encoded socket path)
  grpc-raw-authority SOCKET  plain grpcio sending the raw socket path as :authority, as
                             grpc-java does
  spiffe-jwt SOCKET AUDIENCE py-spiffe: a JWT-SVID and the JWT bundles; the token verified
                             here with PyJWT against the bundle, then by the agent
                             (ValidateJWTSVID) for its audience, another audience and with a
                             tampered signature
"""

import sys
import time

import grpc

FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
HEADER = (("workload.spiffe.io", "true"),)
DEADLINE = 30


def spiffe_x509(socket):
    from spiffe import WorkloadApiClient

    with WorkloadApiClient(socket_path="unix:" + socket, default_timeout=DEADLINE) as client:
        svid = client.fetch_x509_svid()
        print("default", svid.spiffe_id, len(svid.cert_chain))
        for svid in client.fetch_x509_svids():
            print("svid", svid.spiffe_id)
        for bundle in sorted(client.fetch_x509_bundles().bundles, key=lambda b: str(b.trust_domain)):
            print("bundle", bundle.trust_domain, len(bundle.x509_authorities))


def spiffe_jwt(socket, audience):
    from spiffe import JwtSvid, WorkloadApiClient

    with WorkloadApiClient(socket_path="unix:" + socket, default_timeout=DEADLINE) as client:
        svid = client.fetch_jwt_svid(audience={audience})
        print("jwt", svid.spiffe_id, sorted(svid.audience))
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        print("jwt-bundle", bundle.trust_domain, len(bundle.jwt_authorities))
        # An independent JOSE implementation (PyJWT, through py-spiffe) checks the signature.
        verified = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
        print("verified", verified.spiffe_id, verified.expiry - int(time.time()) <= 300)
        print("validated", client.validate_jwt_svid(svid.token, audience).spiffe_id)
        head, payload, signature = svid.token.split(".")
        tampered = ".".join([head, payload, ("A" if signature[0] != "A" else "B") + signature[1:]])
        for name, token, aud in [("other-audience", svid.token, "other"), ("tampered", tampered, audience)]:
            try:
                client.validate_jwt_svid(token, aud)
                print(name, "accepted")
            except Exception as e:  # py-spiffe's ValidateJwtSvidError
                print(name, "refused", "INVALID_ARGUMENT" in str(e))


def raw_fetch(socket, options):
    """FetchX509SVID with no generated code: the empty request, the first answer's bytes."""
    with grpc.insecure_channel("unix:" + socket, options=options) as channel:
        call = channel.unary_stream(
            FETCH_X509_SVID,
            request_serializer=lambda _: b"",
            response_deserializer=lambda data: data,
        )(None, metadata=HEADER, timeout=DEADLINE)
        try:
            first = next(call)
        finally:
            call.cancel()
    # X509SVIDResponse field 1 (svids[0]), whose field 1 is the SPIFFE ID.
    svid = first_field(first, 1)
    print("svid", first_field(svid, 1).decode())


def first_field(message, number):
    """The bytes of the first length-delimited field of `message`, which must come first."""
    tag, at = varint(message, 0)
    if tag != (number << 3 | 2):
        raise ValueError("unexpected protobuf tag %d" % tag)
    length, at = varint(message, at)
    return message[at : at + length]


def varint(data, at):
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def main(argv):
    command, socket = argv[1], argv[2]
    try:
        if command == "spiffe-x509":
            spiffe_x509(socket)
        elif command == "grpc-default":
            raw_fetch(socket, [])
        elif command == "grpc-raw-authority":
            raw_fetch(socket, [("grpc.default_authority", socket)])
        elif command == "spiffe-jwt":
            spiffe_jwt(socket, argv[3])
        else:
            raise SystemExit("unknown command " + command)
    except grpc.RpcError as e:
        print("error", e.code().name, e.details())
        return 1
    except Exception as e:  # py-spiffe wraps the gRPC error in its own
        print("error", type(e).__name__, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
