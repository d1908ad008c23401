"""Unit tests of the gateway's DIMSE engine: PDUs (association negotiation by pynetdicom.pdu),
DIMSE command sets, and message reassembly over a loopback connection (no PACS)."""

from __future__ import annotations

import socket
import struct
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import pdu as ul

from omi_dsf.dicomweb.dimse import pdu
from omi_dsf.dicomweb.dimse.connection import Connection, Peer, messages
from omi_dsf.dicomweb.dimse.contexts import (FIND, GET, LOSSY, UNCOMPRESSED, find_proposals, get_proposals,
                                             storage_scp_contexts, store_proposals)
from omi_dsf.dicomweb.dimse.messages import command, parse_command, part10_meta, store_rq, us_of

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
JPEG, EXPLICIT = "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"


def test_command_set_round_trip():
    cmd = command([(0x0002, b"1.2.3\x00"), (0x0100, struct.pack("<H", 0x0020)), (0x0110, struct.pack("<H", 7))])
    parsed = parse_command(cmd)
    assert struct.unpack("<L", parsed[0x00000000])[0] == len(cmd) - 12  # group length after itself
    assert us_of(parsed, 0x00000100) == 0x0020 and us_of(parsed, 0x00000110) == 7
    assert parsed[0x00000002] == b"1.2.3\x00"


def test_part10_header_is_readable_by_pydicom():
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CT, "1.2.3.4", "X"
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    write_dataset(raw, ds)
    back = dcmread(BytesIO(part10_meta(CT.encode(), b"1.2.3.4", EXPLICIT) + raw.getvalue()))
    assert back.file_meta.TransferSyntaxUID == EXPLICIT and back.PatientID == "X"
    assert back.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"


def test_associate_request_as_pynetdicom_reads_it():
    rq, contexts = pdu.associate_rq("OMIGW", "LEGACYPACS", get_proposals(), scp_roles=True)
    kind, _, length = struct.unpack(">BBL", rq[:6])
    assert kind == pdu.A_ASSOCIATE_RQ and length == len(rq) - 6
    decoded = ul.A_ASSOCIATE_RQ()
    decoded.decode(rq)
    p = decoded.to_primitive()
    assert p.called_ae_title == "LEGACYPACS" and p.calling_ae_title == "OMIGW"
    assert len(contexts) <= 128 and all(cid % 2 == 1 for cid in contexts) and contexts[1] == GET
    roles = [i for i in p.user_information if type(i).__name__ == "SCP_SCU_RoleSelectionNegotiation"]
    classes = set(contexts.values()) - {GET}
    assert len(roles) == len(classes) > 70 and all(r.scp_role for r in roles)  # one per storage class
    # a context per transfer-syntax family for the image classes, uncompressed first
    ct = [cx for cx in p.presentation_context_definition_list if cx.abstract_syntax == CT]
    assert len(ct) == 5 and ct[0].transfer_syntax == [EXPLICIT, "1.2.840.10008.1.2"]
    assert all(len(cx.transfer_syntax) <= 2 for cx in ct)
    lossy = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91"}
    assert not lossy & {str(ts) for cx in p.presentation_context_definition_list for ts in cx.transfer_syntax}
    assert pdu.associate_rq("OMIGW", "LEGACYPACS", get_proposals(), scp_roles=True)[0] is rq  # kept
    _, find_ids = pdu.associate_rq("OMIGW", "LEGACYPACS", find_proposals())
    assert find_ids == {1: FIND}


def test_store_proposes_one_context_per_syntax_family():
    """C-STORE (STOW-RS to a PACS): per SOP class the uncompressed syntaxes in one context and
    each other syntax in its own, so a PACS accepting one syntax per context cannot choose an
    uncompressed one for a compressed instance."""
    jl = "1.2.840.10008.1.2.4.70"
    got = store_proposals([(CT, EXPLICIT), (CT, jl), (CT, jl), (MR, JPEG), (MR, "1.2.840.10008.1.2")])
    assert got == ((CT, UNCOMPRESSED), (CT, (jl,)), (MR, UNCOMPRESSED), (MR, (JPEG,)))


def test_storage_scp_negotiation_round_trip():
    proposals = ((CT, (JPEG, EXPLICIT)), (MR, ("1.2.3.4.5.6",)))  # a transfer syntax nobody knows
    rq, _ = pdu.associate_rq("LEGACYPACS", "OMIGW", proposals)
    request = pdu.parse_request(rq[6:])
    assert (request.called, request.calling, request.max_pdu) == ("OMIGW", "LEGACYPACS", pdu.MAX_PDU)
    ac, accepted = pdu.accept(request, storage_scp_contexts())
    assert accepted == {1: JPEG}  # the proposer's first choice, as stored; context 3 refused
    assert pdu.parse_accept(ac[6:]) == (accepted, pdu.MAX_PDU)
    # the C-MOVE destination takes a lossy syntax only when nothing else is proposed
    assert pdu.accept(request, storage_scp_contexts(), LOSSY)[1] == {1: EXPLICIT}
    only_jpeg = pdu.parse_request(pdu.associate_rq("LEGACYPACS", "OMIGW", ((CT, (JPEG,)),))[0][6:])
    assert pdu.accept(only_jpeg, storage_scp_contexts(), LOSSY)[1] == {1: JPEG}


def test_rejection_is_named():
    rj = ul.A_ASSOCIATE_RJ()
    rj.result, rj.source, rj.reason_diagnostic = 1, 1, 7
    assert "called ae title not recognised" in pdu.reject_reason(rj.encode()[6:]).lower()


def test_large_message_is_fragmented_and_reassembled():
    """A data set bigger than the peer's maximum PDU goes in several P-DATA PDUs, each within the
    limit, and comes back whole with its command and the prefix put in front."""
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    sender, receiver = Connection(Peer("X", "", 0), a), Connection(Peer("Y", "", 0), b)
    sender.peer_max_pdu = 16384
    dataset = bytes(range(256)) * 200   # 51,200 bytes
    wire = pdu.p_data(3, store_rq(CT, "1.2.3", 9), dataset, 16384)
    pos, sizes = 0, []
    while pos < len(wire):
        kind, _, length = struct.unpack_from(">BBL", wire, pos)
        assert kind == pdu.P_DATA_TF
        sizes.append(length)
        pos += 6 + length
    assert len(sizes) >= 4 and max(sizes) <= 16384
    sender.send_message(3, store_rq(CT, "1.2.3", 9), dataset)
    cid, cmd, data = next(messages(receiver, prefix=lambda cid, cmd: b"HEAD"))
    assert cid == 3 and us_of(cmd, 0x00000110) == 9 and data == b"HEAD" + dataset
    sender.close()
    receiver.close()


def test_a_stopped_move_scp_frees_its_port_at_once():
    """A gateway stopping and another starting on the same C-MOVE port (a restart, the tests'
    gateways one after another) must be able to listen: closing the listener while its accept
    thread waits in it kept the port for up to half a second ("Address already in use")."""
    from omi_dsf.dicomweb.dimse.move_scp import MoveScp
    from omi_dsf.processes import free_port

    port = free_port()
    for _ in range(3):
        scp = MoveScp("OMIGW", "127.0.0.1", port).start()
        scp.stop()
        with socket.socket() as probe:   # no one listens any more: the port can be bound right away
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
            probe.listen(1)
