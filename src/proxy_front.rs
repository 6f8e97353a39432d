//! The MQTT connection through `[proxy]`. rumqttc 0.25 cannot be handed a connected stream,
//! and reads a proxy's CONNECT reply without a bound (a proxy that never sends a newline
//! would grow the agent until it is killed). So rumqttc talks to this front on loopback
//! instead: the front does the CONNECT to the real proxy with the project's bounded
//! `proxy::connect`, answers rumqttc with a plain 200, and splices the bytes both ways.
//! rumqttc's TLS to the broker runs through it unchanged. Only this process can use the
//! front (a random password), it connects only to the configured broker, and rumqttc never
//! holds the real proxy's credentials.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

use crate::proxy::{HttpProxy, ProxyError};
use crate::secret::Secret;

/// Largest request head rumqttc sends the front (a CONNECT line and two headers).
const MAX_REQUEST_HEAD: usize = 4096;
/// Time rumqttc gets to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the real proxy gets to answer CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections the front serves at once.
const MAX_CLIENTS: usize = 4;
/// The user name rumqttc presents to the front.
const FRONT_USER: &str = "securetunnel-agent";

/// A running front, for as long as it is kept.
pub struct ProxyFront {
    addr: SocketAddr,
    password: Secret,
    last_error: Arc<Mutex<Option<String>>>,
    _task: AbortOnDropHandle<()>,
}

/// What the front and its connections share.
struct Route {
    proxy: HttpProxy,
    host: String,
    port: u16,
    /// `Basic <base64(user:password)>` that rumqttc must present.
    expected: Secret,
    last_error: Arc<Mutex<Option<String>>>,
}

impl ProxyFront {
    /// A front on a free loopback port, reaching `host:port` through `proxy`.
    pub async fn start(proxy: HttpProxy, host: &str, port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let password = Secret::new(uuid::Uuid::new_v4().simple().to_string());
        let plain = zeroize::Zeroizing::new(format!("{FRONT_USER}:{}", password.expose()));
        let expected = Secret::new(format!(
            "Basic {}",
            data_encoding::BASE64.encode(plain.as_bytes())
        ));
        let last_error = Arc::new(Mutex::new(None));
        let route = Arc::new(Route {
            proxy,
            host: host.to_owned(),
            port,
            expected,
            last_error: last_error.clone(),
        });
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        let task = tokio::spawn(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    // Descriptors exhausted, say: the front must outlive it.
                    Err(e) => {
                        debug!("the MQTT proxy front cannot accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Beyond the bound (only rumqttc should come, once at a time), dropped.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let route = route.clone();
                tokio::spawn(async move {
                    route.serve(client).await;
                    drop(slot);
                });
            }
        });
        Ok(ProxyFront {
            addr,
            password,
            last_error,
            _task: AbortOnDropHandle::new(task),
        })
    }

    /// The proxy setting that sends rumqttc through this front.
    pub fn for_rumqttc(&self) -> rumqttc::Proxy {
        rumqttc::Proxy {
            ty: rumqttc::ProxyType::Http,
            auth: rumqttc::ProxyAuth::Basic {
                username: FRONT_USER.to_owned(),
                password: self.password.expose().to_owned(),
            },
            addr: self.addr.ip().to_string(),
            port: self.addr.port(),
        }
    }

    /// Why the front's last CONNECT to the real proxy failed, naming the proxy.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl Route {
    async fn serve(self: Arc<Self>, mut client: TcpStream) {
        let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut client)).await;
        let authorized = match head {
            Ok(Some(head)) => self.authorized(&head),
            _ => false,
        };
        if !authorized {
            debug!("a connection to the MQTT proxy front without its credentials was refused");
            let _ = client
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                .await;
            return;
        }
        let upstream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            crate::proxy::connect(&self.proxy, &self.host, self.port),
        )
        .await
        .unwrap_or_else(|_| {
            Err(crate::proxy::ProxyError::Io {
                proxy: self.proxy.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer to CONNECT within {}s", CONNECT_TIMEOUT.as_secs()),
                ),
            })
        });
        match upstream {
            Ok(mut upstream) => {
                let _ = crate::net::harden(socket2::SockRef::from(&upstream));
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let done = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    debug!("MQTT connection through the proxy ended: {done:?}");
                }
            }
            Err(e) => {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(describe(&e));
                let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
            }
        }
    }

    /// Rule (front access): the request carries this process's credentials.
    fn authorized(&self, head: &str) -> bool {
        let presented = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("proxy-authorization")
                .then(|| value.trim())
        });
        // Compared by hash: how long a comparison takes tells nothing about the password.
        presented.is_some_and(|p| Secret::new(p).hash() == self.expected.hash())
    }
}

/// rumqttc's request head, at most `MAX_REQUEST_HEAD` bytes; `None` if longer or cut off.
async fn read_head(client: &mut TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = client.read(&mut chunk).await.ok()?;
        if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(head).ok()
}

/// A failed CONNECT to the broker in the words the rest of the agent uses.
fn describe(e: &ProxyError) -> String {
    match e {
        ProxyError::Refused {
            proxy,
            status,
            hint,
            ..
        } => format!("proxy {proxy} refused CONNECT to the broker: {status}{hint}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn front_to(proxy: SocketAddr) -> ProxyFront {
        let proxy = crate::proxy::parse_proxy_url(&format!("http://{proxy}")).unwrap();
        ProxyFront::start(proxy, "broker.example", 8883)
            .await
            .unwrap()
    }

    async fn ask(front: &ProxyFront, auth: &str) -> String {
        let mut c = TcpStream::connect(front.addr).await.unwrap();
        let req = format!(
            "CONNECT broker.example:8883 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {auth}\r\n\r\n"
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let mut reply = String::new();
        let _ = c.read_to_string(&mut reply).await;
        reply
    }

    #[tokio::test]
    async fn only_this_process_may_use_the_front() {
        let nobody = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = front_to(nobody.local_addr().unwrap()).await;
        let reply = ask(&front, "Basic c2VjdXJldHVubmVsLWFnZW50Omd1ZXNz").await;
        assert!(reply.starts_with("HTTP/1.1 407"), "{reply}");
        assert!(front.last_error().is_none(), "the real proxy was asked");
    }

    #[tokio::test]
    async fn a_proxy_that_streams_without_a_newline_is_cut_off_and_named() {
        let endless = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = endless.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = endless.accept().await.unwrap();
            let junk = vec![b'A'; 64 << 10];
            while s.write_all(&junk).await.is_ok() {}
        });
        let front = front_to(proxy).await;
        let rumqttc::ProxyAuth::Basic { username, password } = front.for_rumqttc().auth else {
            panic!("no credentials for rumqttc");
        };
        let basic = data_encoding::BASE64.encode(format!("{username}:{password}").as_bytes());
        let reply = ask(&front, &format!("Basic {basic}")).await;
        assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
        let why = front.last_error().unwrap();
        assert!(
            why.contains(&format!("proxy http://{proxy}")) && why.contains("over 8 KiB"),
            "{why}"
        );
    }
}
