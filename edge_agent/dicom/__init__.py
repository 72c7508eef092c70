"""The DICOM front door: an asyncio upper-layer (PS3.8) acceptor with its DIMSE reader.

``fsm``: the upper-layer state/event table (acceptor side). ``pdu``: PDU framing and the
small PDUs encoded by hand. ``dimse``: command sets (group 0000, implicit VR little endian).
``negotiation``: A-ASSOCIATE-RQ to an A-ASSOCIATE-AC or a rejection. ``server``: the asyncio
server, one :class:`~edge_agent.dicom.server.Connection` per TCP connection, every limit.
"""
