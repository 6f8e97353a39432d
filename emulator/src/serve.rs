//! Serving peers: TLS, the websocket upgrade, registering a peer with its tunnel, and the
//! tunnel's end at its lifetime.

use crate::*;

/// Opens a tunnel from the control plane: lifetime in (scaled) minutes.
pub(crate) fn open_tunnel(shared: &Arc<Shared>, spec: state::TunnelSpec) -> TunnelTokens {
    let lifetime = shared.minute * spec.timeout_minutes;
    let tokens = shared.lock().open_with(spec, lifetime);
    close_at_lifetime(shared, &tokens.tunnel_id, lifetime);
    tokens
}

/// Rotation never extends this: the deadline is fixed when the tunnel opens.
pub(crate) fn close_at_lifetime(shared: &Arc<Shared>, tunnel_id: &str, lifetime: Duration) {
    let (shared, id) = (Arc::downgrade(shared), tunnel_id.to_owned());
    tokio::spawn(async move {
        tokio::time::sleep(lifetime).await;
        if let Some(shared) = shared.upgrade() {
            close_tunnel(&shared, &id, "tunnel lifetime ended");
        }
    });
}

pub(crate) fn close_tunnel(shared: &Shared, tunnel_id: &str, reason: &str) {
    let peers = shared.lock().close_tunnel(tunnel_id);
    for p in peers {
        if p.tx
            .try_send(PeerCmd::Close(1000, reason.to_owned()))
            .is_err()
        {
            p.kill.cancel();
        }
    }
    info!(tunnel = %tunnel_id, reason, "tunnel closed");
    shared.changed();
}

/// The acceptor, and the PEM of the CA that signed a generated certificate. A generated
/// certificate also names the region's real data-plane host, so an agent that derives the
/// endpoint from the notify's region verifies it as it would the real service.
pub(crate) fn tls_acceptor(
    tls: EmulatorTls,
    region: &str,
) -> Result<(Option<TlsAcceptor>, Option<String>), EmulatorError> {
    let cert_err = |e: &dyn std::fmt::Display| EmulatorError::Certificate(e.to_string());
    let (issued, ca_pem) = match tls {
        EmulatorTls::Plain => return Ok((None, None)),
        EmulatorTls::Pem { cert_pem, key_pem } => (pki::Issued { cert_pem, key_pem }, None),
        EmulatorTls::Generate => {
            let ca = pki::TestPki::new("securetunnel emulator CA").map_err(|e| cert_err(&e))?;
            let host = securetunnel_agent::bridge::DataEndpoint::for_region(region).host;
            let issued = ca.server(&[&host]).map_err(|e| cert_err(&e))?;
            (issued, Some(ca.ca_pem()))
        }
    };
    let key = issued.key_der().map_err(|e| cert_err(&e))?;
    let config = rustls::ServerConfig::builder_with_provider(securetunnel_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(&e))?
        .with_no_client_auth()
        .with_single_cert(issued.cert_der(), key)
        .map_err(|e| cert_err(&e))?;
    Ok((Some(TlsAcceptor::from(Arc::new(config))), ca_pem))
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    conns.spawn(serve(tcp, tls.clone(), shared.clone()));
                }
                Err(e) => {
                    debug!("emulator accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

pub(crate) async fn serve(tcp: TcpStream, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn securetunnel_agent::bridge::Io> = match tls {
        Some(acceptor) => match acceptor.accept(tcp).await {
            Ok(s) => Box::new(s),
            Err(e) => {
                debug!("emulator TLS handshake failed: {e}");
                return;
            }
        },
        None => Box::new(tcp),
    };
    let io = pong_filter::PongFilter::new(io, shared.drop_pongs.clone());
    let mut decision = None;
    // The callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let channel_id = uuid::Uuid::new_v4().to_string();
        let verdict = handshake::decide(&mut shared.lock(), req);
        let channel = HeaderValue::from_str(&channel_id).unwrap_or(HeaderValue::from_static("-"));
        // The service dates its answers; `doctor` compares the gateway's clock with it.
        let date = HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
            .unwrap_or(HeaderValue::from_static("-"));
        match verdict {
            Ok(accepted) => {
                let h = resp.headers_mut();
                h.insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_static(accepted.subprotocol),
                );
                h.insert("channel-id", channel);
                h.insert("date", date);
                decision = Some(accepted);
                Ok(resp)
            }
            Err(rejected) => {
                debug!(status = rejected.status, body = %rejected.body, "emulator rejected a handshake");
                let mut err = ErrorResponse::new(Some(rejected.body));
                *err.status_mut() =
                    StatusCode::from_u16(rejected.status).unwrap_or(StatusCode::BAD_REQUEST);
                err.headers_mut().insert("channel-id", channel);
                err.headers_mut().insert("date", date);
                Err(err)
            }
        }
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async_with_config(
        io,
        callback,
        Some(ws_config()),
    )
    .await
    {
        Ok(ws) => ws,
        Err(e) => {
            debug!("emulator websocket handshake ended: {e}");
            return;
        }
    };
    ws.get_mut().start_framing();
    let Some(accepted) = decision else { return };
    let (tunnel_id, mode) = (accepted.tunnel_id, accepted.mode);
    let id = shared.next_peer.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(PEER_QUEUE);
    let handle = PeerHandle {
        id,
        tx: tx.clone(),
        kill: CancellationToken::new(),
        subprotocol: accepted.subprotocol,
        token: accepted.token,
        client_token: accepted.client_token,
        hole: CancellationToken::new(),
    };
    if !register(&shared, &tunnel_id, mode, handle.clone()) {
        return;
    }
    let faults = peer::Faults {
        drop_after: *shared.drop_after.lock().unwrap_or_else(|e| e.into_inner()),
        hole_after: *shared.hole_after.lock().unwrap_or_else(|e| e.into_inner()),
    };
    peer::run(shared, tunnel_id, mode, handle, ws, (tx, rx), faults).await;
}

/// Installs a newly connected peer: SERVICE_IDS first (V2/V3 peers), the replaced peer
/// closed, and STREAM_RESET for the open streams sent to the other side (docs/protocol.md §3.5).
pub(crate) fn register(shared: &Shared, tunnel_id: &str, mode: Mode, peer: PeerHandle) -> bool {
    let (old, other, resets) = {
        let mut st = shared.lock();
        let Some(t) = st.tunnel_mut(tunnel_id).filter(|t| !t.closed) else {
            return false;
        };
        if peer.subprotocol != SUBPROTOCOL_V1 {
            let mut raw = BytesMut::new();
            if FrameCodec
                .encode(&Message::service_ids(&t.services), &mut raw)
                .is_ok()
            {
                // The queue is new and empty: this cannot fail.
                let _ = peer.tx.try_send(PeerCmd::Frame(raw.freeze()));
            }
        }
        t.record(&peer, mode, PeerEventKind::Connected);
        let old = t.set_peer(mode, peer);
        // A (re)connected peer knows none of the open streams: the service resets them on
        // the other side (docs/protocol.md §3.5), unless the switch is off.
        let resets: Vec<Message> = if shared.reset_on_reconnect.load(Ordering::Relaxed) {
            t.active_streams
                .drain()
                .map(|(service, stream)| Message::stream_reset(stream, &service))
                .collect()
        } else {
            Vec::new()
        };
        (old, t.peer(mode.peer()).cloned(), resets)
    };
    if let Some(old) = old {
        let policy = *shared
            .replaced_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        info!(tunnel = %tunnel_id, %mode, ?policy, "peer replaced by a new connection");
        match policy {
            // A black-holed peer reads no commands: it can only be dropped.
            _ if old.hole.is_cancelled() => old.kill.cancel(),
            ReplacedPeer::Close => {
                if old
                    .tx
                    .try_send(PeerCmd::Close(1000, "replaced by a new connection".into()))
                    .is_err()
                {
                    old.kill.cancel();
                }
            }
            ReplacedPeer::Keep => {}
            ReplacedPeer::Drop => old.kill.cancel(),
        }
    }
    if let Some(other) = other {
        for msg in resets {
            let mut raw = BytesMut::new();
            if FrameCodec.encode(&msg, &mut raw).is_err() {
                continue;
            }
            // The service does not drop its resets: behind a full queue (the other peer busy
            // with data), it is delivered once there is room.
            match other.tx.try_send(PeerCmd::Frame(raw.freeze())) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(cmd)) => {
                    let tx = other.tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(cmd).await;
                    });
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    debug!("the other peer is gone: no STREAM_RESET to deliver");
                }
            }
        }
    }
    shared.changed();
    true
}
