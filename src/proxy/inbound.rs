//! A socket's read side with the bytes read but not yet forwarded: the
//! detectors look at them, then they are replayed upstream byte for byte.

use crate::detect::Detect;
use crate::net::forward::{Activity, forward, read_ready, try_read_append, write_all};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Read size for bodies forwarded in user space.
const BODY_CHUNK: usize = crate::net::forward::SCRATCH_SIZE;
/// A buffer this large, or twice what it holds, is given back once its
/// message is forwarded.
const GROW_FROM: usize = 4 * 1024;

/// Why a read for a hello or head did not produce one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError<E> {
    /// The parser refused the bytes.
    Invalid(E),
    /// The deadline passed first.
    Timeout,
    /// End of stream with this many bytes of an unfinished message.
    Closed {
        partial: usize,
    },
    Io,
}

pub struct Inbound<'a> {
    stream: &'a TcpStream,
    buf: Vec<u8>,
}

impl<'a> Inbound<'a> {
    pub fn new(stream: &'a TcpStream) -> Inbound<'a> {
        Inbound {
            stream,
            buf: Vec::new(),
        }
    }

    /// Bytes read and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Gives back the room a body or a large head made, once a message is
    /// forwarded: a kept-alive connection waiting for its next request then
    /// holds no buffer. Bytes of the next message already read stay.
    pub fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = Vec::new();
        } else if self.buf.capacity() > GROW_FROM.max(2 * self.buf.len()) {
            self.buf.shrink_to_fit();
        }
    }

    /// Replaces the first `n` buffered bytes with `with` (a rewritten head).
    pub fn replace_front(&mut self, n: usize, with: &[u8]) {
        self.buf.splice(..n, with.iter().copied());
    }

    /// Reads until `parse` accepts or refuses the buffered bytes, never
    /// holding more than `cap` bytes and never waiting past `deadline`.
    /// Waiting is on socket readiness: no polling.
    pub async fn read_message<T, E>(
        &mut self,
        cap: usize,
        deadline: Instant,
        parse: impl Fn(&[u8]) -> Detect<T, E>,
        too_large: E,
    ) -> Result<T, ReadError<E>> {
        loop {
            match parse(&self.buf) {
                Detect::Done(message) => return Ok(message),
                Detect::Invalid(e) => return Err(ReadError::Invalid(e)),
                Detect::Incomplete if self.buf.len() >= cap => {
                    return Err(ReadError::Invalid(too_large));
                }
                Detect::Incomplete => {}
            }
            match tokio::time::timeout_at(deadline, self.read_more(cap)).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(Err(_)) => return Err(ReadError::Io),
                Ok(Ok(0)) => {
                    return Err(ReadError::Closed {
                        partial: self.buf.len(),
                    });
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Waits until at least one byte is buffered; false at end of stream.
    pub async fn wait_for_data(&mut self) -> io::Result<bool> {
        if !self.buf.is_empty() {
            return Ok(true);
        }
        Ok(self.read_body().await? > 0)
    }

    /// One read for a body, into a buffer of [`BODY_CHUNK`] made whole.
    /// Bodies are read in that one size, which the allocator then hands
    /// from connection to connection; reads of every size the network
    /// delivers would each leave pages of their own size class behind
    /// (an idle kept-alive connection measured 19 KiB of RSS so, 4 to 6
    /// this way).
    async fn read_body(&mut self) -> io::Result<usize> {
        self.read(BODY_CHUNK, true).await
    }

    /// One read of at most `cap - buffered` bytes. 0 at end of stream.
    async fn read_more(&mut self, cap: usize) -> io::Result<usize> {
        self.read(cap, false).await
    }

    /// One read of at most `cap - buffered` bytes, with room for all of
    /// them made first if `whole`. 0 at end of stream.
    async fn read(&mut self, cap: usize, whole: bool) -> io::Result<usize> {
        let room = cap.saturating_sub(self.buf.len());
        if room == 0 {
            return Err(io::Error::other("buffer full"));
        }
        loop {
            // Room is made only once there is something to read: a
            // kept-alive connection waiting for its next message holds none.
            read_ready(self.stream).await?;
            if whole {
                self.buf.reserve_exact(room);
            }
            match try_read_append(self.stream, &mut self.buf, room) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Forwards the first `n` buffered bytes to `dst`.
    pub async fn forward_buffered(
        &mut self,
        n: usize,
        dst: &TcpStream,
        count: &AtomicU64,
    ) -> io::Result<()> {
        write_all(dst, &self.buf[..n]).await?;
        self.buf.drain(..n);
        count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Forwards exactly `n` more bytes of the stream (buffered ones first).
    pub async fn forward_exact(
        &mut self,
        mut n: u64,
        dst: &TcpStream,
        activity: &Activity,
        count: &AtomicU64,
    ) -> io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() && self.read_body().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
            self.forward_buffered(take, dst, count).await?;
            activity.touch();
            n -= take as u64;
        }
        Ok(())
    }

    /// Forwards a chunked body up to and including its last CRLF.
    pub async fn forward_chunked(
        &mut self,
        dst: &TcpStream,
        activity: &Activity,
        count: &AtomicU64,
    ) -> io::Result<()> {
        let mut decoder = crate::detect::http::ChunkedDecoder::default();
        loop {
            let take = decoder
                .advance(&self.buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.forward_buffered(take, dst, count).await?;
            activity.touch();
            if decoder.is_done() {
                return Ok(());
            }
            if self.read_body().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Forwards everything until end of stream (buffered bytes first, then
    /// zero-copy), then half-closes `dst`.
    pub async fn forward_rest(
        mut self,
        dst: &TcpStream,
        activity: &Activity,
        count: &AtomicU64,
    ) -> io::Result<()> {
        let n = self.buf.len();
        self.forward_buffered(n, dst, count).await?;
        forward(self.stream, dst, activity, count).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::forward::tests::pair;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// A whole message, as the detectors say: `len` bytes.
    fn exactly(len: usize) -> impl Fn(&[u8]) -> Detect<usize, ()> {
        move |buf: &[u8]| {
            if buf.len() >= len {
                Detect::Done(buf.len())
            } else {
                Detect::Incomplete
            }
        }
    }

    /// A hello costs what it holds, not a fixed buffer: thousands of
    /// connections may sit between their hello and their upstream.
    #[tokio::test]
    async fn a_message_holds_only_its_own_bytes() {
        let (mut client, accepted) = pair().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut inbound = Inbound::new(&accepted);

        client.write_all(&[0x16; 517]).await.unwrap();
        let read = inbound.read_message(16 * 1024, deadline, exactly(517), ());
        assert_eq!(read.await, Ok(517));
        assert_eq!(inbound.buffered(), &[0x16; 517][..]);
        assert!(inbound.buf.capacity() < 1024, "{}", inbound.buf.capacity());

        // A message in two reads is put together in order.
        let mut inbound = Inbound::new(&accepted);
        let whole: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        client.write_all(&whole[..1000]).await.unwrap();
        let writer = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&whole[1000..]).await.unwrap();
        };
        let read = inbound.read_message(16 * 1024, deadline, exactly(3000), ());
        let (read, ()) = tokio::join!(read, writer);
        assert_eq!(read, Ok(3000));
        assert_eq!(inbound.buffered(), &whole[..]);
    }

    #[tokio::test]
    async fn a_message_past_its_cap_is_refused() {
        let (mut client, accepted) = pair().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut inbound = Inbound::new(&accepted);
        client.write_all(&[1; 5000]).await.unwrap();
        let read = inbound.read_message(4096, deadline, exactly(5000), ());
        assert_eq!(read.await, Err(ReadError::Invalid(())));
        assert!(inbound.buffered().len() <= 4096);
    }
}
