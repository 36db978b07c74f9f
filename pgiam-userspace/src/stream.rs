//! Transport plumbing shared by both sides: one boxed stream type for plain TCP, unix and TLS,
//! a stream that replays bytes already read, and the two halves of a stream that one task
//! drives in both directions.

use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {
    /// Ready once a read would not wait: bytes, the end of the stream or an error are there
    /// to be read. A session waits on this with no read buffer, and makes room only for bytes
    /// that have come. A stream that cannot tell is always ready (its reads wait with the
    /// buffer, as any read does).
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Stream for tokio::net::TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

impl Stream for tokio::net::UnixStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::UnixStream::poll_read_ready(self, cx)
    }
}

/// Over TLS the socket's readiness is not the answer: rustls may hold plaintext it already
/// decrypted (a record larger than the last read) while the socket has nothing more, and bytes
/// on the socket may be only part of a record. Filling rustls' own plaintext buffer answers
/// both, and needs no buffer of the caller's.
impl<S: Stream> Stream for tokio_rustls::server::TlsStream<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_fill_buf(cx).map_ok(|_| ())
    }
}

impl<S: Stream> Stream for tokio_rustls::client::TlsStream<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_fill_buf(cx).map_ok(|_| ())
    }
}

impl<S: Stream> Stream for Rewind<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            self.inner.poll_read_ready(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

impl Stream for tokio::io::Empty {}

#[cfg(test)]
impl Stream for tokio::io::DuplexStream {}

impl Stream for Box<dyn Stream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_read_ready(cx)
    }
}

/// TCP, unix or TLS over either: the session does not care which.
pub type BoxStream = Box<dyn Stream>;

/// A stream that one task reads and writes at once, through [`Split::halves`]. Each half
/// holds the stream only for the length of one poll, so the halves never wait for each other;
/// unlike `tokio::io::split` (whose halves may live in different tasks) it needs no allocation.
pub struct Split<S>(Mutex<S>);

impl<S> Split<S> {
    pub fn new(stream: S) -> Self {
        Split(Mutex::new(stream))
    }

    /// The stream back, once its halves are gone.
    pub fn into_inner(self) -> S {
        self.0.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    pub fn halves(&self) -> (Half<'_, S>, Half<'_, S>) {
        (Half(&self.0), Half(&self.0))
    }
}

/// One direction's handle on a [`Split`] stream.
pub struct Half<'a, S>(&'a Mutex<S>);

impl<S> Half<'_, S> {
    fn lock(&self) -> MutexGuard<'_, S> {
        // Only ever held for one poll of the stream, which leaves it consistent.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: Stream> Stream for Half<'_, S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.lock().poll_read_ready(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Half<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.lock().is_write_vectored()
    }
}

/// Replays `prefix` before reading from `inner`. Used when the first bytes of a connection
/// turn out to be a TLS ClientHello (direct SSL) that the TLS acceptor must see.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A socket that never says it is readable: whatever readiness a stream over it reports
    /// comes from what the stream itself holds.
    struct NeverReady(DuplexStream);

    impl AsyncRead for NeverReady {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for NeverReady {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl Stream for NeverReady {
        fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    /// rustls decrypts a whole record at a time: what a short read left of it is buffered in
    /// the TLS stream, not on the socket. A session waiting on the socket there would stall.
    #[tokio::test]
    async fn tls_plaintext_already_decrypted_is_ready() {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = issued.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(issued.key_pair.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (near, far) = tokio::io::duplex(1 << 16);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (server, client) = tokio::join!(
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(NeverReady(near)),
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, far),
        );
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        client.write_all(&[7; 3000]).await.unwrap();
        client.flush().await.unwrap();
        let mut first = [0; 100];
        server.read_exact(&mut first).await.unwrap();

        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            server.poll_read_ready(&mut cx).is_ready(),
            "the rest of the record is decrypted and waiting"
        );
        let mut rest = vec![0; 2900];
        server.read_exact(&mut rest).await.unwrap();
        assert!(server.poll_read_ready(&mut cx).is_pending());
    }

    #[tokio::test]
    async fn prefix_is_read_first() {
        let mut r = Rewind::new(Bytes::from_static(b"ab"), &b"cd"[..]);
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"abcd");
    }
}
