//! Splits a glommio TCP stream into a read half and a write half that two
//! tasks of the same executor can use at once. The halves share the stream
//! through an `Rc<RefCell<_>>`; a borrow lasts only for one poll, which on a
//! single-threaded executor never overlaps another.

use futures_lite::{AsyncRead, AsyncWrite};
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use super::TcpStream;

/// Reading half of a split stream.
pub struct ReadHalf(Rc<RefCell<TcpStream>>);
/// Writing half of a split stream.
pub struct WriteHalf(Rc<RefCell<TcpStream>>);

/// Splits `stream` into halves.
pub fn split(stream: TcpStream) -> (ReadHalf, WriteHalf) {
    let s = Rc::new(RefCell::new(stream));
    (ReadHalf(s.clone()), WriteHalf(s))
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)
    }
}
