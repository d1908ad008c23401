"""The DIMSE side of the gateway, in pynetdicom's layers, one engine for every service:

  pdu         Upper Layer PDUs: association negotiation by pynetdicom.pdu, P-DATA written here
  messages    DIMSE command sets, identifiers, the Part 10 header of a received data set
  connection  the socket and the association on it, message reassembly, the association pool
  contexts    the presentation contexts proposed and accepted per service
  find        C-FIND;  retrieve  C-GET and C-MOVE;  move_scp  the C-MOVE destination;  store  C-STORE

Why not pynetdicom's own association and DIMSE layers: docs/gateway.md "DIMSE engine".
"""
